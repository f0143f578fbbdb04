"""Hyper-parameters of the Mimi codec.

The defaults are the official Mimi (``tokenizer-e351c8d8-checkpoint125.safetensors``,
as built by moshi's ``loaders.get_mimi``). ``MimiConfig.from_json`` reads a file
with the same three sections as moshi's ``_seanet_kwargs`` / ``_transformer_kwargs``
/ ``_quantizer_kwargs`` (for example the tiny golden ``mimi_config.json``).

Only the variant Mimi actually uses is implemented (causal convolutions, ELU,
no weight norm, RoPE transformer without gating, learnt conv resampling); any
other value is rejected when the config is built, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class SEANetConfig:
    """SEANet encoder/decoder (the same arguments build both)."""

    channels: int = 1
    dimension: int = 512
    causal: bool = True
    n_filters: int = 64
    n_residual_layers: int = 1
    activation: str = "ELU"
    compress: int = 2
    dilation_base: int = 2
    disable_norm_outer_blocks: int = 0
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    norm: str = "none"
    pad_mode: str = "constant"
    # Decoder order (upsampling); the encoder uses them reversed.
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    true_skip: bool = True

    def validate(self) -> None:
        _require(self.causal, "seanet.causal must be true (only the causal Mimi is implemented)")
        _require(self.activation == "ELU", f"seanet.activation {self.activation!r} unsupported (ELU only)")
        # Weight norm is folded into plain weights in the released checkpoints.
        _require(self.norm == "none", f"seanet.norm {self.norm!r} unsupported ('none' only)")
        _require(self.pad_mode == "constant", f"seanet.pad_mode {self.pad_mode!r} unsupported ('constant' only)")
        _require(self.true_skip, "seanet.true_skip must be true (no shortcut convolution implemented)")
        _require(len(self.ratios) > 0 and all(r > 0 for r in self.ratios), "seanet.ratios must be positive")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)


@dataclass
class MimiTransformerConfig:
    """The projected transformer placed after the SEANet encoder and before the decoder."""

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    causal: bool = True
    layer_scale: float | None = 0.01
    context: int = 250
    conv_layout: bool = True
    max_period: float = 10000
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "rope"
    dim_feedforward: int = 2048
    input_dimension: int = 512
    output_dimensions: list[int] = field(default_factory=lambda: [512])

    def validate(self) -> None:
        _require(self.causal, "transformer.causal must be true")
        _require(self.conv_layout, "transformer.conv_layout must be true")
        _require(self.gating == "none", f"transformer.gating {self.gating!r} unsupported ('none' only)")
        _require(self.norm == "layer_norm", f"transformer.norm {self.norm!r} unsupported ('layer_norm' only)")
        _require(
            self.positional_embedding == "rope",
            f"transformer.positional_embedding {self.positional_embedding!r} unsupported ('rope' only)",
        )
        _require(self.d_model % self.num_heads == 0, "transformer.d_model must be divisible by num_heads")
        _require((self.d_model // self.num_heads) % 2 == 0, "transformer head dim must be even for RoPE")
        _require(self.context > 0, "transformer.context must be positive")
        _require(len(self.output_dimensions) == 1, "exactly one transformer output is supported")


@dataclass
class QuantizerConfig:
    """Split residual VQ: ``n_q_semantic`` semantic codebooks, the rest acoustic."""

    dimension: int = 256
    n_q: int = 32
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1

    def validate(self) -> None:
        _require(self.n_q > self.n_q_semantic >= 1, "quantizer.n_q must exceed n_q_semantic >= 1")
        _require(self.bins > 0 and self.dimension > 0, "quantizer.bins and dimension must be positive")


@dataclass
class MimiConfig:
    """Everything needed to build ``MimiCodec``; defaults are the official Mimi."""

    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    sample_rate: int = 24000
    frame_rate: float = 12.5
    num_codebooks: int = 8
    resample_method: str = "conv"
    causal: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.seanet.validate()
        self.transformer.validate()
        self.quantizer.validate()
        _require(self.causal, "causal must be true")
        _require(self.resample_method == "conv", f"resample_method {self.resample_method!r} unsupported ('conv' only)")
        _require(
            self.transformer.input_dimension == self.seanet.dimension
            and self.transformer.output_dimensions[0] == self.seanet.dimension,
            "transformer input/output dimensions must equal seanet.dimension",
        )
        _require(
            self.quantizer.input_dimension == self.seanet.dimension
            and self.quantizer.output_dimension == self.seanet.dimension,
            "quantizer input/output dimensions must equal seanet.dimension",
        )
        _require(
            self.quantizer.n_q_semantic <= self.num_codebooks <= self.quantizer.n_q,
            f"num_codebooks {self.num_codebooks} must lie in [{self.quantizer.n_q_semantic}, {self.quantizer.n_q}]",
        )
        stride = self.encoder_frame_rate / self.frame_rate
        _require(
            stride == int(stride) and stride >= 1,
            f"encoder frame rate {self.encoder_frame_rate} must be an integer multiple of frame_rate {self.frame_rate}",
        )
        _require(self.frame_size == self.sample_rate / self.frame_rate, "sample_rate / frame_rate must be an integer")

    # Derived sizes -----------------------------------------------------------------------

    @property
    def encoder_frame_rate(self) -> float:
        """Frame rate of the SEANet latent (25 Hz for the official model)."""
        return self.sample_rate / self.seanet.hop_length

    @property
    def resample_stride(self) -> int:
        """Latent steps per codec frame (2: 25 Hz -> 12.5 Hz)."""
        return int(self.encoder_frame_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per codec frame (1920 at 24 kHz / 12.5 Hz)."""
        return int(self.sample_rate / self.frame_rate)

    # (De)serialisation -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MimiConfig:
        """Build from a mapping shaped like ``mimi_config.json`` (unknown keys are ignored with a warning)."""
        sections = {"seanet": SEANetConfig, "transformer": MimiTransformerConfig, "quantizer": QuantizerConfig}
        kwargs: dict[str, Any] = {}
        top = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key.startswith("_"):  # comments such as "_comment"
                continue
            if key in sections:
                kwargs[key] = _build(sections[key], value, key)
            elif key in top:
                kwargs[key] = value
            else:
                log.warning("mimi config: ignoring unknown key %r", key)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> MimiConfig:
        """Read a JSON file with sections ``seanet``, ``transformer``, ``quantizer`` (+ top-level rates)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"mimi config: {where} must be an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
        elif not key.startswith("_"):
            log.warning("mimi config: ignoring unknown key %s.%s", where, key)
    return cls(**kwargs)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"mimi config: {message}")
