"""Int8 weights for the Mimi decoder: what ``quantize="int8" | "int4"`` does to the audio decoder.

A streaming frame feeds two positions through the decoder transformer and one through the first
SEANet layers, so their products are matrix-vector products whose cost is reading the weights:
on the 2-core CI machine, the full-size decoder's transformer (25 M parameters, 100 MB in float32)
took ~11 ms a frame in float32 against ~2 ms with int8 weights, and the first transposed
convolution (8.4 M parameters) 3.6 against 0.25 ms: together two thirds of a frame, a quarter of a
quantized chat turn's time (``bench/bench_model.py``). So the transformer's linear layers and the
SEANet convolutions of at least ``MIN_CONV_WEIGHTS`` weights get int8 copies (per-output-row scales,
``Int8Linear``); the small 24 kHz convolutions, the codebooks and the encoder keep their dtype.
int8 in both quantize modes: the codec's output is the audio itself, with no sampling after it to
absorb int4's coarser noise. The LFM2.5 detokenizer's backbone gets the same treatment
(``quantize_detokenizer_int8``).
"""

from __future__ import annotations

from torch import nn

from lfm2audio.codec.detokenizer import AudioDetokenizer
from lfm2audio.codec.mimi import MimiCodec
from lfm2audio.codec.seanet import CausalConv1d, CausalConvTranspose1d
from lfm2audio.model.quantize import Int8Linear, join_float_projections

MIN_CONV_WEIGHTS = 1 << 20


def _int8_linears(root: nn.Module) -> None:
    """Replace every ``nn.Linear`` below ``root`` by an ``Int8Linear`` (the float weights are dropped)."""
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear):
            owner_name, _, attr = name.rpartition(".")
            owner = root.get_submodule(owner_name) if owner_name else root
            setattr(owner, attr, Int8Linear.from_float(module.weight.detach(), module.bias))


def quantize_decoder_int8(codec: MimiCodec) -> MimiCodec:
    """Give ``codec``'s decoder int8 weights in place (see the module docstring); returns ``codec``.

    The transformer's linear layers are replaced (their float weights are dropped); the convolutions
    keep their float weights beside the copies, which their forward passes use.
    """
    _int8_linears(codec.decoder_transformer)
    for module in codec.decoder.modules():
        if isinstance(module, CausalConv1d) and module.groups == 1:
            conv = module.conv.conv
            if conv.weight.numel() >= MIN_CONV_WEIGHTS:
                weight = conv.weight.detach().reshape(module.out_channels, -1)  # (out, in * K): im2col order
                module.weight_matmul = Int8Linear.from_float(weight, conv.bias)
        elif isinstance(module, CausalConvTranspose1d) and module.groups == 1:
            convtr = module.convtr.convtr
            if convtr.weight.numel() >= MIN_CONV_WEIGHTS:
                weight = convtr.weight.detach().reshape(module.in_channels, -1).t()  # (out * K, in)
                module.weight_matmul = Int8Linear.from_float(weight.contiguous())
    return codec


def quantize_detokenizer_int8(detokenizer: AudioDetokenizer) -> AudioDetokenizer:
    """The LFM2.5 detokenizer's backbone linear layers as int8, in place; returns it.

    Its six 75 Hz positions of a frame read every backbone weight once, as Mimi's transformer does.
    The output head (``lin``, 0.7 M weights) keeps its dtype, as do the embedding and the ISTFT.
    """
    join_float_projections(detokenizer.lfm, Int8Linear.from_float)  # w1 + w3, q + k + v: one product each
    _int8_linears(detokenizer.lfm)
    return detokenizer


def quantize_codec_int8(codec: MimiCodec | AudioDetokenizer) -> MimiCodec | AudioDetokenizer:
    """The audio decoder's int8 treatment above, for either codec (in place; returns it)."""
    if isinstance(codec, MimiCodec):
        return quantize_decoder_int8(codec)
    return quantize_detokenizer_int8(codec)
