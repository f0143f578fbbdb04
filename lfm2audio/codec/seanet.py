"""SEANet encoder/decoder of Mimi: causal (transposed) convolutions, ELU, residual blocks.

Layout: every tensor here is time-major, ``(batch, time, channels)``, so convolutions are
plain matrix products over rows: a convolution is ``sum_k rows(k) @ W_k`` over its kernel
taps, each term a strided view of the input (no im2col copy; the batch is flattened into
one matrix and the few rows that straddle two batch rows are recomputed apart), and a
transposed convolution with ``kernel = 2 * stride`` (all of Mimi's) is two products (the
taps of the current and of the next output block) plus an overlap-add. On CPU this is
1.5-3x faster than ``F.conv1d`` / ``F.conv_transpose1d`` for the shapes Mimi streams, and
needs no layout change between layers (the transformers and the quantizer are time-major too).

Causality: a convolution sees ``(K - 1) * dilation + 1 - stride`` samples of history (the
left padding of the whole-clip computation: zeros, or the stream's first sample for
``pad_mode="replicate"``) and nothing on the right; a transposed convolution emits
``stride`` samples per input step and carries the ``K - stride`` samples that overlap the
next input (its "partial" outputs, bias excluded) to the next call. Processing is always
incremental: modules expose ``stream_state(batch)`` (tensors in traversal order) and
``step(x, states)``, which consumes them from an iterator and updates them in place. A
whole clip is just one big step from a fresh state.

Parameter names follow the official checkpoint (``model.3.conv.conv.weight``,
``model.2.convtr.convtr.weight``, ``model.1.block.1.conv.conv.weight``...), which is why
each convolution sits two attribute levels deep; weights keep their PyTorch layouts
((out, in, K) for convs, (in, out, K) for transposed convs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mimi_config import SEANetConfig

# Convolutions with at most this many weights run on a re-laid-out copy of their weight
# (per-tap matrices for convs, head/tail halves for transposed convs): fastest, but costs
# memory (about 25 MB for the official Mimi). The largest layers (which Mimi runs at its
# lowest frame rates) use their original weight: im2col for convs, one product + strided
# overlap-add for transposed convs.
_DERIVE_MAX = 1 << 21


def tensor_identity(t: Tensor) -> tuple:
    """Storage, in-place version, device and dtype of ``t``: changes whenever its values may have.

    Inference tensors (created under torch.inference_mode) have no version counter, and cannot be
    modified in place outside it, so their storage alone identifies them.
    """
    return (t.data_ptr(), -1 if t.is_inference() else t._version, t.device, t.dtype)


class _Wrap(nn.Module):
    """One empty level of nesting, present only so parameter names match the official checkpoint."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.add_module(name, module)


class _Derived:
    """A tensor derived from a parameter (e.g. a re-laid-out weight), rebuilt whenever the
    parameter is replaced, moved or modified in place. Holding the parameter itself makes the
    check sound: its storage cannot be freed and reused while we compare data pointers."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.src: Tensor | None = None
        self.key: tuple | None = None
        self.value: Tensor | None = None

    def get(self, p: Tensor) -> Tensor:
        key = tensor_identity(p)
        if self.value is None or self.src is not p or self.key != key:
            self.value = self.fn(p.detach())
            self.src, self.key = p, key
        return self.value


class CausalConv1d(nn.Module):
    """Causal Conv1d on (B, T, C_in) -> (B, T // stride, C_out); weights at ``conv.conv.{weight,bias}``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unsupported pad_mode {pad_mode!r}")
        self.conv = _Wrap(
            "conv",
            nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.pad_mode = pad_mode
        self.span = (kernel_size - 1) * dilation + 1
        # History one output needs beyond its own stride = the causal left padding.
        self.tail = self.span - stride
        if self.tail < 0:
            raise ValueError("kernel (with dilation) smaller than stride is not supported")
        self.use_taps = groups == 1 and kernel_size > 1 and in_channels * out_channels * kernel_size <= _DERIVE_MAX
        self._taps = _Derived(lambda w: w.permute(2, 1, 0).contiguous())  # (K, C_in, C_out)
        # When set (``lfm2audio.codec.int8``): the product with the weight as a (C_out, C_in * K) matrix,
        # bias included, e.g. an int8 copy of it; im2col then feeds it.
        self.weight_matmul: nn.Module | None = None

    def stream_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        return [torch.zeros(batch, self.tail, self.in_channels, device=device, dtype=dtype)] if self.tail else []

    def step(self, x: Tensor, states: Iterator[Tensor], first: Tensor | None = None) -> Tensor:
        """Next ``n * stride`` steps of every row. ``first`` (B,) bool marks rows whose stream starts
        here; only ``pad_mode="replicate"`` needs it (its padding is the stream's first step)."""
        if not self.tail:
            return self._valid(x)
        tail = next(states)
        if self.pad_mode == "replicate":
            if first is None:
                raise ValueError("replicate padding needs the per-row 'first' mask")
            tail.copy_(torch.where(first.view(-1, 1, 1), x[:, :1].expand_as(tail), tail))
        T = x.shape[1]
        if self.use_taps and self.weight_matmul is None and T >= self.tail and T % self.stride == 0:
            y = self._taps_with_history(x, tail)
            tail.copy_(x[:, T - self.tail :])
            return y
        x = torch.cat([tail, x], dim=1)
        tail.copy_(x[:, x.shape[1] - self.tail :])
        return self._valid(x)

    def _valid(self, x: Tensor) -> Tensor:
        """Unpadded convolution of (B, L, C_in) -> (B, (L - span) // stride + 1, C_out)."""
        conv = self.conv.conv
        w, b = conv.weight, conv.bias
        B, L, _ = x.shape
        if self.groups != 1:
            y = F.conv1d(x.transpose(1, 2), w, b, self.stride, 0, self.dilation, self.groups)
            return y.transpose(1, 2).contiguous()
        if self.kernel_size == 1 and self.weight_matmul is None:
            return F.linear(x, w.view(self.out_channels, -1), b)
        t_out = (L - self.span) // self.stride + 1
        if self.use_taps and self.weight_matmul is None and (B == 1 or L % self.stride == 0):
            # Flattened batch: rows straddling two batch rows are computed, then dropped.
            rows = -(-L // self.stride)
            out = self._taps_flat(x.reshape(B * L, -1), 0, (B - 1) * rows + t_out, B * rows)
            return out.view(B, rows, -1)[:, :t_out]
        win = x.unfold(1, self.span, self.stride)  # (B, T', C_in, span)
        if self.dilation > 1:
            win = win[..., :: self.dilation]
        # im2col rows ordered (c_in, k) like the weight's (out, in, K) layout: no weight copy.
        cols = win.reshape(B * t_out, -1)
        if self.weight_matmul is not None:
            return self.weight_matmul(cols).view(B, t_out, self.out_channels)
        w2 = w.view(self.out_channels, -1).t()
        y = torch.addmm(b, cols, w2) if b is not None else cols @ w2
        return y.view(B, t_out, self.out_channels)

    def _taps_flat(self, flat: Tensor, start: int, n: int, rows: int, skip: int = 0) -> Tensor:
        """Output rows ``skip .. n-1`` of a (rows, C_out) buffer, row i being
        ``bias + sum_k flat[start + (i - skip) * stride + k * dilation] @ W_k``: one matrix product
        per kernel tap on strided row views of ``flat`` (no im2col copy)."""
        taps = self._taps.get(self.conv.conv.weight)
        S, d = self.stride, self.dilation
        out = torch.empty(rows, self.out_channels, device=flat.device, dtype=flat.dtype)
        if n <= skip:
            return out
        dst = out[skip:n]
        last = (n - skip - 1) * S + 1
        bias = self.conv.conv.bias
        if bias is not None:
            torch.addmm(bias, flat[start : start + last : S], taps[0], out=dst)
        else:
            torch.mm(flat[start : start + last : S], taps[0], out=dst)
        for k in range(1, self.kernel_size):
            dst.addmm_(flat[start + k * d : start + k * d + last : S], taps[k])
        return out

    def _taps_with_history(self, x: Tensor, history: Tensor) -> Tensor:
        """Streaming conv of (B, T, C_in) after ``history`` (B, tail, C_in) without concatenating
        them: outputs whose window lies inside ``x`` come from the flattened batch in one pass,
        the first ``ceil(tail / stride)`` outputs of each row (the only ones that see the
        history, and the only ones the flat pass gets wrong) are computed apart and written over."""
        B, T, _ = x.shape
        S = self.stride
        t_out = T // S
        n_head = -(-self.tail // S)
        out = self._taps_flat(x.reshape(B * T, -1), n_head * S - self.tail, B * t_out, B * t_out, skip=n_head)
        out = out.view(B, t_out, -1)
        head_in = torch.cat([history, x[:, : n_head * S]], dim=1)
        out[:, :n_head] = self._valid(head_in)
        return out


class CausalConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d (kernel = 2 * stride) on (B, T, C_in) -> (B, T * stride, C_out);
    weights at ``convtr.convtr.{weight,bias}``. ``groups`` is 1 or the channel count (depthwise)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        if kernel_size != 2 * stride:
            raise ValueError("only kernel_size == 2 * stride is implemented (all of Mimi's transposed convs)")
        if groups not in (1, in_channels) or (groups > 1 and in_channels != out_channels):
            raise ValueError("only dense or depthwise transposed convolutions are implemented")
        self.convtr = _Wrap(
            "convtr", nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.use_halves = groups == 1 and in_channels * out_channels * kernel_size <= _DERIVE_MAX
        # (2, C_in, S * C_out): kernel taps 0..S-1 ("head") and S..2S-1 ("tail"), outputs time-major.
        self._halves = _Derived(
            lambda w: w.view(in_channels, out_channels, 2, stride).permute(2, 0, 3, 1).reshape(2, in_channels, -1)
        )
        # When set (``lfm2audio.codec.int8``): the product with the weight as a (C_in, C_out * K) matrix,
        # bias excluded, e.g. an int8 copy of it.
        self.weight_matmul: nn.Module | None = None

    def stream_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        # Partial outputs (bias excluded) of the last input step that fall into the next call.
        return [torch.zeros(batch, self.stride, self.out_channels, device=device, dtype=dtype)]

    def step(self, x: Tensor, states: Iterator[Tensor]) -> Tensor:
        convtr = self.convtr.convtr
        w, b = convtr.weight, convtr.bias
        partial = next(states)
        B, T, _ = x.shape
        S, c_out = self.stride, self.out_channels
        # Input step t contributes head[t] (kernel taps 0..S-1) to output block t and
        # tail[t] (taps S..2S-1) to block t+1; a block is (S, C_out), time-major.
        if self.use_halves and self.weight_matmul is None:
            halves = self._halves.get(w)
            flat = x.reshape(B * T, -1)
            z = (torch.addmm(b.repeat(S), flat, halves[0]) if b is not None else flat @ halves[0]).view(B, T, S, c_out)
            tail = (flat @ halves[1]).view(B, T, S, c_out)
        elif self.groups == 1:
            flat = x.reshape(B * T, -1)
            y = self.weight_matmul(flat) if self.weight_matmul is not None else flat @ w.view(self.in_channels, -1)
            y = y.view(B, T, c_out, 2, S)
            head, tail = y[:, :, :, 0].transpose(2, 3), y[:, :, :, 1].transpose(2, 3)
            z = torch.empty(B, T, S, c_out, device=x.device, dtype=x.dtype)
            if b is not None:
                torch.add(head, b, out=z)
            else:
                z.copy_(head)
        else:
            taps = w[:, 0].t()  # (2S, C): tap k of channel c
            z = torch.empty(B, T, S, c_out, device=x.device, dtype=x.dtype)
            torch.mul(x[:, :, None], taps[:S], out=z)
            if b is not None:
                z += b
            tail = x[:, :, None] * taps[S:]
        # add_ on the views (``z[i] += t`` would also copy the view onto itself: a full extra pass)
        z[:, 1:].add_(tail[:, :-1])
        z[:, 0].add_(partial)
        partial.copy_(tail[:, -1])
        return z.view(B, T * S, c_out)


class ResidualBlock(nn.Module):
    """``x + conv1x1(elu(conv_k(elu(x))))`` with a ``compress``-times narrower hidden layer."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, pad_mode: str) -> None:
        super().__init__()
        hidden = dim // compress
        # The first ELU must keep x (the skip path); the second acts on a fresh conv output.
        self.block = nn.Sequential(
            nn.ELU(),
            CausalConv1d(dim, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode),
            nn.ELU(inplace=True),
            CausalConv1d(hidden, dim, 1, pad_mode=pad_mode),
        )

    def stream_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        return _stream_state(self.block, batch, device, dtype)

    def step(self, x: Tensor, states: Iterator[Tensor]) -> Tensor:
        return _step(self.block, x, states).add_(x)


_Stateful = (CausalConv1d, CausalConvTranspose1d, ResidualBlock)


def _elu() -> nn.ELU:
    # Between top-level layers the ELU input is always a fresh layer output: overwrite it.
    return nn.ELU(inplace=True)


def _stream_state(modules: nn.Sequential, batch: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    out: list[Tensor] = []
    for m in modules:
        if isinstance(m, _Stateful):
            out += m.stream_state(batch, device, dtype)
    return out


def _step(modules: nn.Sequential, x: Tensor, states: Iterator[Tensor]) -> Tensor:
    for m in modules:
        x = m.step(x, states) if isinstance(m, _Stateful) else m(x)
    return x


class SEANetEncoder(nn.Module):
    """Waveform (B, S, channels) -> latent (B, S / hop, dimension), time-major."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        nf, pad = cfg.n_filters, cfg.pad_mode
        layers: list[nn.Module] = [CausalConv1d(cfg.channels, nf, cfg.kernel_size, pad_mode=pad)]
        mult = 1
        for ratio in reversed(cfg.ratios):
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(mult * nf, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, pad)
                )
            layers += [_elu(), CausalConv1d(mult * nf, 2 * mult * nf, 2 * ratio, stride=ratio, pad_mode=pad)]
            mult *= 2
        layers += [_elu(), CausalConv1d(mult * nf, cfg.dimension, cfg.last_kernel_size, pad_mode=pad)]
        self.model = nn.Sequential(*layers)
        self.hop_length = cfg.hop_length

    def stream_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        return _stream_state(self.model, batch, device, dtype)

    def step(self, x: Tensor, states: Iterator[Tensor]) -> Tensor:
        return _step(self.model, x, states)


class SEANetDecoder(nn.Module):
    """Latent (B, T, dimension) -> waveform (B, T * hop, channels), time-major."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        nf, pad = cfg.n_filters, cfg.pad_mode
        mult = 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dimension, mult * nf, cfg.kernel_size, pad_mode=pad)]
        for ratio in cfg.ratios:
            layers += [_elu(), CausalConvTranspose1d(mult * nf, mult * nf // 2, 2 * ratio, stride=ratio)]
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(mult * nf // 2, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, pad)
                )
            mult //= 2
        layers += [_elu(), CausalConv1d(nf, cfg.channels, cfg.last_kernel_size, pad_mode=pad)]
        self.model = nn.Sequential(*layers)
        self.hop_length = cfg.hop_length

    def stream_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        return _stream_state(self.model, batch, device, dtype)

    def step(self, z: Tensor, states: Iterator[Tensor]) -> Tensor:
        return _step(self.model, z, states)
