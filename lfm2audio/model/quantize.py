"""Int8 / int4 linear layers for CPU, built with PyTorch's own kernels and one of this project's.

- ``int8``: symmetric, one scale per output channel. The model's projections are ``W8A8Linear``:
  int8 activations too (each row scaled to its own peak), on fbgemm's packed u8 x s8 kernel, which
  reads the weights at the memory's speed; where fbgemm is missing, ``Int8Linear``:
  ``aten._weight_int8pack_mm`` with bf16 activations (the codec's layers use it too).
- ``int4``: asymmetric, a scale and a zero point per ``group_size`` input features of each output
  channel. On x86-64 with AVX2 the layers are ``W4A8Linear``: int8 activations too (per row and
  group), on this project's own AVX2 kernel (``w4a8.py``), which reads the packed weights at the
  memory's speed where PyTorch's int4 kernel is compute-bound; elsewhere ``Int4Linear``, weight-only,
  ``aten._weight_int4pack_mm_for_cpu`` on the layout of ``aten._convert_weight_to_int4pack_for_cpu``.
  Both hold the same codes and scales.

The weight-only kernels take bfloat16 activations (measured on torch 2.13, this project's AVX-512
CPU, an 8192x2048 layer, one row: int8 0.44 ms, int4 0.26 ms, float32 matmul 1.35 ms; with float32
activations they fall back to a path 30-60x slower), so such a layer casts its input to bfloat16 and
its output back to the input's dtype: the rest of the model keeps its dtype. Scales and zero points
are rounded to bfloat16 *before* the weights are rounded to integers, so the stored integers are
the best ones for the scales the kernel actually uses.

The int4 kernel needs the output width to be a multiple of 16 and the input width a multiple of the
group size; a layer that does not fit (e.g. a 2049-wide codebook head) is quantized to int8 instead.
CPU only: on other devices :func:`check_quantize` refuses with a clear error.

The weights are quantized one tensor at a time, as they are read (see ``lfm2audio.loading``), so a
float copy of the whole model never exists. Sibling projections that read the same input (each
feed-forward's ``w1`` and ``w3``, each backbone attention block's q, k and v: a module's ``joinable``)
are quantized as one layer (``join_projections``): the same integers and scales, one product.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lfm2audio.model import w4a8

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


def _rows(x: Tensor, dtype: torch.dtype = _ACT) -> Tensor:
    """``x`` as a contiguous (rows, features) matrix of ``dtype`` (the kernels want exactly that).

    Each call skips what it does not need: a decode step calls a few hundred quantized layers
    per frame, one row each, and a dispatched no-op costs about as much as a small op."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dtype:
        x = x.to(dtype)
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


class W8A8Linear(nn.Module):
    """int8 weights (one scale per output channel) and int8 activations, on fbgemm's u8 x s8 kernel.

    Each input row is divided by its own largest magnitude, so that one fixed grid (``1 / levels``
    steps around zero point ``levels + 1``) fits every row: a row's quantization depends on that row
    only, and a row gives the same bits alone or in any batch (the products are summed in int32).
    The output is scaled back row by row. One op reads the weights (the kernel keeps only its packed
    copy, one byte a weight), against ``_weight_int8pack_mm``'s bf16 path: measured on this project's
    2-core AVX-512 machine, the full-size backbone's 90 projections for one row took 20-34 ms
    against 40-51 ms (the packed kernel is memory-bound on one thread, the bf16 one compute-bound).
    Without VNNI the kernel adds byte products in saturating 16-bit pairs, so an input can have only
    7 bits there (``act_levels``, as torch's own dynamic quantization does with ``reduce_range``),
    which costs too much accuracy (a tiny model's hidden states drift twice as far as with 8 bits).
    There each row is fed twice in the same call: its 7-bit value, and what that left over, scaled
    up to fill the grid again (``residual``). The weights are read once for both, so one row costs
    7-13% more (measured on a 2-core Zen 3: the kernel is memory-bound), many rows twice the integer
    arithmetic; the input then has about 13 bits.

    ``rotate``: the input is heavy-tailed (a gated product: a row's peak sits far above its bulk, which
    then gets few levels), so the layer works on ``x @ H`` and ``W @ H`` instead, ``H`` a block-diagonal
    Hadamard matrix (orthogonal, so the product is unchanged): each block of the row is spread evenly
    before it is quantized (the rotation trick of QuaRot).
    """

    def __init__(
        self,
        packed: torch.ScriptObject,
        in_features: int,
        out_features: int,
        bias: Tensor | None,
        rotation: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.packed = packed  # fbgemm's packed weight (not a tensor: it stays out of the state dict)
        self.in_features, self.out_features = in_features, out_features
        # What the packed copy holds: a byte a weight, a float scale and an int32 column sum per row.
        self.packed_bytes = out_features * (in_features + 8)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.register_buffer("rotation", rotation, persistent=False)
        self.levels = act_levels()  # the input grid's steps each side of zero
        self.residual = self.levels < 127  # 7-bit grid: a second pass for the remainder
        self._register()

    def _register(self) -> None:
        """A key of its own for the compiled op (``_w8a8_matmul``) to find this layer by."""
        self.key = next(_w8a8_keys)
        _w8a8_layers[self.key] = weakref.ref(self, lambda _, key=self.key: _w8a8_layers.pop(key, None))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._register()  # a deep copy (or an unpickled layer) must not answer to the original's key

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None, *, rotate: bool = False) -> W8A8Linear:
        out_features, in_features = weight.shape
        rotation = hadamard(rotation_block(in_features)) if rotate else None
        if rotation is not None:
            weight = _rotate(weight.float(), rotation)
        q, scales = quantize_int8(weight, torch.float32)
        previous = torch.backends.quantized.engine
        with warnings.catch_warnings():
            # torch 2.13 deprecates the qint8 tensor the packing op takes; w8a8_available() turns this layer
            # off (Int8Linear instead) where a later torch has removed it.
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scales.double(), torch.zeros(out_features, dtype=torch.long), 0
            )
            del q
            try:
                torch.backends.quantized.engine = "fbgemm"  # the packed class (and so the kernel) follows it
                packed = torch.ops.quantized.linear_prepack(qweight, None)
            finally:
                torch.backends.quantized.engine = previous
        return cls(packed, in_features, out_features, bias, rotation)

    def dequantize(self) -> Tensor:
        """The float weight the layer applies to its (unrotated) input."""
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        w = qweight.dequantize()
        return w if self.rotation is None else _rotate(w, self.rotation)  # H @ H = I

    def forward(self, x: Tensor) -> Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.rotation is not None:
            x2 = _rotate(x2, self.rotation)
        # The row's peak: abs + amax is exact and 2.5-9x faster than the inf-norm (vectorised; ~3 against 6-83 us).
        peak = x2.abs().amax(-1, keepdim=True).clamp_min_(1e-30)  # an all-zero row stays zero
        u, L = x2 / peak, self.levels
        if self.residual:
            coarse = torch.round(u * L).div_(L)  # on the grid already: the kernel quantizes it exactly
            fine = (u - coarse).mul_(2 * L)  # the rounding error, at most half a step: back into [-1, 1]
            both = self._matmul(torch.cat([coarse, fine]))
            y = both[: len(u)].add_(both[len(u) :], alpha=1.0 / (2 * L))
        else:
            y = self._matmul(u)
        y = y.mul_(peak)
        if self.bias is not None:
            y = y.add_(self.bias)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, u: Tensor) -> Tensor:
        """``u @ W.T`` for rows ``u`` in [-1, 1], quantized on the fixed grid of ``levels`` steps."""
        if torch.compiler.is_compiling():  # torch.compile cannot trace the packed weight: an opaque op
            return _w8a8_matmul(u, self.key)
        return self._packed_matmul(u)

    def _packed_matmul(self, u: Tensor) -> Tensor:
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            u, 1.0 / self.levels, self.levels + 1, self.packed
        )

    def extra_repr(self) -> str:
        extra = "" if self.rotation is None else f", rotation_block={self.rotation.shape[0]}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + extra


# The W8A8 product as a custom op for torch.compile (lfm2audio.model.compiled): dynamo cannot put
# fbgemm's packed weight (a ScriptObject) in a graph, and a graph break at every projection made a
# compiled depthformer frame 1.45x slower than eager. The op takes the layer's key instead; the
# registry holds layers weakly, so it keeps no weights alive.
_w8a8_keys = itertools.count()
_w8a8_layers: dict[int, weakref.ReferenceType[W8A8Linear]] = {}


def _w8a8_layer(key: int) -> W8A8Linear:
    layer = _w8a8_layers[key]()
    if layer is None:
        raise RuntimeError(f"W8A8Linear {key} no longer exists (a compiled graph outlived its model)")
    return layer


@torch.library.custom_op("lfm2audio::w8a8_matmul", mutates_args=())
def _w8a8_matmul(u: Tensor, key: int) -> Tensor:
    return _w8a8_layer(key)._packed_matmul(u)


@_w8a8_matmul.register_fake
def _(u: Tensor, key: int) -> Tensor:
    return u.new_empty(u.shape[0], _w8a8_layer(key).out_features)


ROTATION_BLOCK = 128  # Hadamard block of a rotated input: spreads a peak over 128 features, ~15 us a row


def rotation_block(in_features: int) -> int:
    """The largest power of two up to ``ROTATION_BLOCK`` that divides ``in_features``."""
    b = ROTATION_BLOCK
    while in_features % b:
        b //= 2
    return b


@functools.cache
def hadamard(size: int) -> Tensor:
    """The ``size`` x ``size`` Sylvester Hadamard matrix over sqrt(size): symmetric and orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size**0.5


def _rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """Each row of ``x`` (rows, features) times the block-diagonal matrix of ``rotation`` blocks."""
    b = rotation.shape[0]
    return (x.reshape(-1, b) @ rotation).view(x.shape)


@functools.cache
def act_levels() -> int:
    """Activation steps each side of zero: 127 (8 bits) where the CPU has VNNI, else 63 (7 bits).
    Read once, when the first W8A8 layer is built, not at import."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 63
    return 127 if " avx512_vnni" in flags or " avx_vnni" in flags else 63


@functools.cache
def w8a8_available() -> bool:
    """fbgemm is built in (x86 builds of torch), packs a weight and runs the fixed-scale float-in,
    float-out op: tried once on a small layer, so that a torch without them falls back cleanly."""
    try:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return False
        layer = W8A8Linear.from_float(torch.eye(16))
        x = torch.linspace(-1, 1, 16)[None]
        return bool(torch.allclose(layer(x), x, atol=0.02))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def int8_linear(weight: Tensor, bias: Tensor | None = None, *, rotate: bool = False) -> nn.Module:
    """The int8 layer of the model's projections: ``W8A8Linear`` where fbgemm is, else ``Int8Linear``
    (bf16 activations, so ``rotate`` does not apply)."""
    if w8a8_available():
        return W8A8Linear.from_float(weight, bias, rotate=rotate)
    return Int8Linear.from_float(weight, bias)


def rotated_input(name: str) -> bool:
    """Whether the int8 layer ``name`` rotates its input: the backbone's layers that read a gated product
    (the feed-forward's ``w2``, the conv and attention blocks' ``out_proj``). Measured on the full-size
    random checkpoint, teacher-forced over 200 positions: with every input per-row int8 and none rotated
    the text logits' cosine to float32 was 0.9887, w2 alone accounting for most of the loss; rotating
    these two gave 0.9941, keeping them in bf16 0.9958, and rotating every layer no better (0.9923).
    The depthformer's layers lost nothing measurable (0.9957 against 0.9959 with bf16 activations)."""
    return name.startswith("lfm.layers.") and name.endswith((".feed_forward.w2", ".out_proj"))


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
        mod.weight, mod.scales_and_zeros = pack_int4(weight, group_size)
        return mod

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x), self.weight, self.group_size, self.scales_and_zeros)
        return _out(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class W4A8Linear(nn.Module):
    """Int4Linear's weights (the same codes and scales) with int8 activations, on the AVX2 / AVX-512 VNNI
    kernel of ``w4a8.py``, which reads the packed weights at about the memory's speed where ATen's int4
    kernel is compute-bound. Each input row is quantized per group of ``group_size`` features on its own
    peak, so a row gives the same bits alone or in any batch. Buffers, in the kernel's tiles of 16 output
    rows (``w4a8.pack``): ``weight`` uint8 (tiles, in / 8, 64), ``scales`` and ``corr`` float32
    (tiles, in / group_size, 16) (a weight is code * scale + corr).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: Tensor | None = None) -> None:
        super().__init__()
        if not w4a8.fits(in_features, group_size):
            raise ValueError(f"W4A8Linear needs group_size % {w4a8.FEATURES} == 0 dividing in_features, "
                             f"got in_features={in_features}, group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        tiles, groups = w4a8.tiles(out_features), in_features // group_size
        weight_shape = (tiles, in_features // w4a8.FEATURES, w4a8.TILE_ROW_BYTES)
        self.register_buffer("weight", torch.empty(weight_shape, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty((tiles, groups, w4a8.TILE), dtype=torch.float32))
        self.register_buffer("corr", torch.empty((tiles, groups, w4a8.TILE), dtype=torch.float32))
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int, bias: Tensor | None = None) -> W4A8Linear:
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, group_size, bias)
        # A block of rows at a time, like pack_int4: a whole layer's int32 codes never exist at once. Blocks
        # are whole tiles, so only the last one is padded.
        blocks = _row_blocks(weight, 8 << 20, multiple=w4a8.TILE)
        parts = [w4a8.pack(*_int4_block(block, group_size)) for block in blocks]
        mod.weight, mod.scales, mod.corr = (torch.cat([p[i] for p in parts]) for i in range(3))
        return mod

    def forward(self, x: Tensor) -> Tensor:
        product = w4a8.linear if torch.compiler.is_compiling() else w4a8.matmul  # the op only where traced
        y = product(_rows(x, torch.float32), self.weight, self.scales, self.corr, self.out_features)
        return _out(y, x, self.bias, self.out_features)

    extra_repr = Int4Linear.extra_repr


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and in_features % group_size == 0 and group_size % 2 == 0


def _row_blocks(weight: Tensor, max_bytes: int = 32 << 20, multiple: int = 1) -> list[Tensor]:
    """``weight`` split into blocks of rows (a multiple of ``multiple``) of at most ``max_bytes`` in float32,
    so that quantizing a 65536-row table never holds several float copies of it (peak memory while loading)."""
    rows = max(1, max_bytes // (4 * weight.shape[1]))
    rows = max(multiple, rows - rows % multiple)
    return list(weight.split(rows))


def quantize_int8(weight: Tensor, scale_dtype: torch.dtype = _ACT) -> tuple[Tensor, Tensor]:
    """(int8 weight, per-row scales in ``scale_dtype``) with weight ~= q * scale; the largest |w| of a
    row maps to 127."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    start = 0
    for block in _row_blocks(weight):
        w = block.float()
        s = (w.abs().amax(1) / 127).clamp(min=1e-12).to(scale_dtype)
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
    q = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    sz = torch.empty((in_features // group_size, out_features, 2), dtype=_ACT, device=weight.device)
    start = 0
    for block in _row_blocks(weight):
        n = block.shape[0]
        q[start : start + n], sz[:, start : start + n] = _int4_block(block, group_size)
        start += n
    return q, sz


def _int4_block(block: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``quantize_int4`` of one block of rows (n, in): int32 q (n, in) and scales_and_zeros (groups, n, 2)."""
    n, in_features = block.shape
    w = block.to(torch.float32, copy=True).reshape(n, in_features // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(_ACT).float()
    zeros = (lo + 8 * scales).to(_ACT).float()
    q = w.sub_(zeros[..., None]).div_(scales[..., None]).add_(8).round_().clamp_(0, 15)  # in place: one copy
    return q.reshape(n, in_features).to(torch.int32), torch.stack([scales, zeros], -1).transpose(0, 1)


INT4_PACK_ROWS = 64  # the CPU int4 layout packs blocks of 64 output rows (int4_packs_by_rows checks it)


def _pack_int4(q: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # inner_k_tiles: ignored on CPU


@functools.cache
def int4_packs_by_rows() -> bool:
    """Whether packing blocks of ``INT4_PACK_ROWS`` rows apart (a shorter last one included) gives the
    whole weight's packing, so that a layer never holds its full int32 codes while loading."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (2 * INT4_PACK_ROWS + 16, 64), dtype=torch.int32, generator=gen)
    whole = _pack_int4(q)
    return torch.equal(whole, torch.cat([_pack_int4(b) for b in q.split(INT4_PACK_ROWS)]))


def pack_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(the CPU kernel's packed uint8 weight, bf16 scales_and_zeros) of a float ``weight`` (out, in):
    ``quantize_int4`` then packed, a block of rows at a time where the layout allows (peak memory
    while loading: a whole 8192x2048 layer's int32 codes are 67 MB)."""
    if not int4_packs_by_rows():
        q, sz = quantize_int4(weight, group_size)
        return _pack_int4(q), sz
    # Each block's int32 codes are packed (a byte per two weights) and dropped before the next block's
    # are made; joining the packed parts costs little beside them.
    blocks = (_int4_block(block, group_size) for block in _row_blocks(weight, 8 << 20, INT4_PACK_ROWS))
    parts = [(_pack_int4(q), sz) for q, sz in blocks]
    return torch.cat([p for p, _ in parts]), torch.cat([sz for _, sz in parts], 1).to(_ACT)


def int4_group(in_features: int, group_size: int) -> int:
    """``group_size``, halved (down to 32) until it divides ``in_features`` (small test models)."""
    g = group_size
    while g > 32 and in_features % g:
        g //= 2
    return g


def quantized_linear(
    weight: Tensor,
    bias: Tensor | None,
    quantize: Quantize,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    rotate: bool = False,
) -> nn.Module:
    """An int8 layer (``int8_linear``) or Int4Linear for a float ``weight`` (out, in); int4 falls back
    to int8 where it cannot fit."""
    out_features, in_features = weight.shape
    g = int4_group(in_features, group_size)
    if quantize == "int4" and w4a8.available() and w4a8.fits(in_features, g):
        return W4A8Linear.from_float(weight, g, bias)
    if quantize == "int4" and int4_fits(in_features, out_features, g):
        return Int4Linear.from_float(weight, g, bias)
    return int8_linear(weight, bias, rotate=rotate)


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
        model.text_head = int8_linear(model.lfm.embed_tokens.weight.detach())
    for name, module in model.named_modules():
        if not name.startswith("depth_embeddings.") or not getattr(module, "tie", False):
            continue
        head = getattr(module, "to_logits", None)
        if isinstance(head, nn.Linear):
            module.to_logits = int8_linear(module.embedding.weight.detach(), head.bias)


MakeLayer = Callable[[Tensor, "Tensor | None"], nn.Module]  # (float weight (out, in), bias) -> a layer


def join_projections(owner: nn.Module, name: str, make: MakeLayer) -> None:
    """Replace ``owner``'s float layers ``owner.joinable[name]`` by one layer ``make(weight, bias)`` named
    ``name``, their weights stacked in order: its output is theirs side by side.

    Sibling projections read the same input, so one product reads all their weights: a decode step's
    products are matrix-vector ones, and each quantized call also pays its own input quantization and
    dispatch. Quantization is per output row (int8) or per row and group (int4), so the joined layer
    holds the very integers and scales of the separate ones, and gives their bits
    (``tests/test_quantize.py``). Measured on a 2-core Zen 3, full-size random weights, int8, paired:
    a depthformer frame 0.92x, a backbone step 0.93-0.97x the separate layers' time
    (``bench/bench_joined_projections.py``)."""
    parts = [getattr(owner, part) for part in owner.joinable[name]]
    weight = torch.cat([p.weight.detach() for p in parts])
    biases = [p.bias for p in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([p.bias.detach() if p.bias is not None else weight.new_zeros(p.out_features) for p in parts])
    del parts, biases
    for part in owner.joinable[name]:
        delattr(owner, part)
    setattr(owner, name, make(weight, bias))


def joinable_groups(root: nn.Module) -> list[tuple[str, nn.Module, str, tuple[str, ...]]]:
    """(owner's name, owner, joined layer's name, its parts' names) of each group of a module's
    ``joinable`` below ``root``; a list, so that joining while walking it changes nothing it walks."""
    return [
        (owner_name, owner, joined, parts)
        for owner_name, owner in root.named_modules()
        for joined, parts in getattr(owner, "joinable", {}).items()
    ]


def join_float_projections(root: nn.Module, make: MakeLayer) -> int:
    """``join_projections`` for every group below ``root`` whose layers are all float ``nn.Linear``
    (a model loaded in float, then quantized); returns how many groups were joined."""
    joined = 0
    for _, owner, name, parts in joinable_groups(root):
        if all(isinstance(getattr(owner, p, None), nn.Linear) for p in parts):
            join_projections(owner, name, make)
            joined += 1
    return joined
