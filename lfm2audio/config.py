"""Typed configuration parsed from the official ``config.json`` files.

Every dataclass mirrors one section of the checkpoint's config. Parsing is
strict about what matters and lenient about what does not: a missing required
key raises ``ConfigError`` naming it, an unknown key is ignored with a warning
(new upstream fields must not break loading).
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


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can build."""


def parse_section(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from the mapping ``data`` found at ``where``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
        else:
            log.warning("%s: ignoring unknown config key %r", where, key)
    missing = [
        name
        for name, f in known.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.init
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(repr(m) for m in missing)}")
    return cls(**kwargs)


@dataclass
class PreprocessorConfig:
    """NeMo ``AudioToMelSpectrogramPreprocessor`` settings (log-mel features)."""

    sample_rate: int = 16000
    normalize: str = "per_feature"
    window_size: float = 0.025
    window_stride: float = 0.01
    window: str = "hann"
    features: int = 128
    n_fft: int = 512
    log: bool = True
    frame_splicing: int = 1
    dither: float = 1e-5
    pad_to: int = 0
    pad_value: float = 0.0
    # Not in config.json: NeMo's code default.
    preemph: float = 0.97


@dataclass
class EncoderConfig:
    """FastConformer encoder settings (NeMo ``ConformerEncoder`` names)."""

    feat_in: int
    n_layers: int
    d_model: int
    feat_out: int = -1
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    causal_downsampling: bool = False
    reduction: str | None = None
    reduction_position: int | None = None
    reduction_factor: int = 1
    ff_expansion_factor: int = 4
    self_attention_model: str = "rel_pos"
    n_heads: int = 8
    att_context_size: list[int] = field(default_factory=lambda: [-1, -1])
    xscaling: bool = False
    untie_biases: bool = True
    pos_emb_max_len: int = 5000
    conv_kernel_size: int = 9
    conv_norm_type: str = "batch_norm"
    conv_context_size: Any = None
    dropout: float = 0.1
    dropout_pre_encoder: float = 0.1
    dropout_emb: float = 0.0
    dropout_att: float = 0.1

    def __post_init__(self) -> None:
        if self.subsampling != "dw_striding":
            raise ConfigError(f"encoder.subsampling: only 'dw_striding' is supported, got {self.subsampling!r}")
        if self.subsampling_factor != 8:
            raise ConfigError(f"encoder.subsampling_factor: only 8 is supported, got {self.subsampling_factor}")
        if self.self_attention_model != "rel_pos":
            raise ConfigError(
                f"encoder.self_attention_model: only 'rel_pos' is supported, got {self.self_attention_model!r}"
            )
        if self.conv_norm_type != "batch_norm":
            raise ConfigError(f"encoder.conv_norm_type: only 'batch_norm' is supported, got {self.conv_norm_type!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"encoder: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    @property
    def output_dim(self) -> int:
        return self.feat_out if self.feat_out > 0 else self.d_model


@dataclass
class LFM2Config:
    """LFM2 hybrid backbone (Hugging Face ``Lfm2Config`` names).

    Used for the main backbone and for the LFM2.5 audio detokenizer, whose
    attention layers are ``sliding_attention`` with ``sliding_window``.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int | None = None
    block_ff_dim: int | None = None
    layer_types: list[str] | None = None
    full_attn_idxs: list[int] | None = None
    block_auto_adjust_ff_dim: bool = True
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 256
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    conv_L_cache: int = 3
    conv_bias: bool = False
    max_position_embeddings: int = 128_000
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 7
    pad_token_id: int = 0
    # Detokenizer only: width of the spectral head.
    output_size: int | None = None
    # Fields of the official schema that do not change inference.
    model_type: str = "lfm2"
    architectures: list[str] | None = None
    num_heads: int | None = None
    conv_dim: int | None = None
    conv_dim_out: int | None = None
    conv_use_xavier_init: bool = True
    block_dim: int | None = None
    block_norm_eps: float | None = None
    block_mlp_init_scale: float = 1.0
    block_out_init_scale: float = 1.0
    block_use_swiglu: bool = True
    block_use_xavier_init: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    use_pos_enc: bool = True
    tie_embedding: bool = True
    torch_dtype: str | None = None
    transformers_version: str | None = None

    def __post_init__(self) -> None:
        if self.intermediate_size is None and self.block_ff_dim is None:
            raise ConfigError("lfm: missing required key 'intermediate_size' (or 'block_ff_dim')")
        if self.layer_types is None:
            if self.full_attn_idxs is None:
                raise ConfigError("lfm: missing required key 'layer_types' (or 'full_attn_idxs')")
            attn = set(self.full_attn_idxs)
            self.layer_types = ["full_attention" if i in attn else "conv" for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"lfm: layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {"conv", "full_attention", "sliding_attention"})
        if bad:
            raise ConfigError(f"lfm: unknown layer type(s) {bad}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("lfm: 'sliding_attention' layers need 'sliding_window'")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("lfm: hidden_size is not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("lfm: num_attention_heads is not divisible by num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ff_dim(self) -> int:
        """Effective SwiGLU width, with LFM2's automatic adjustment."""
        # transformers reads intermediate_size; the original block_ff_dim is its twin.
        ff = self.intermediate_size if self.intermediate_size is not None else self.block_ff_dim
        assert ff is not None
        if self.block_auto_adjust_ff_dim:
            ff = int(2 * ff / 3)
            # As in transformers' Lfm2MLP, rounding to block_multiple_of only happens with a multiplier.
            if self.block_ffn_dim_multiplier is not None:
                ff = int(self.block_ffn_dim_multiplier * ff)
                ff = self.block_multiple_of * math.ceil(ff / self.block_multiple_of)
        return ff


@dataclass
class DepthformerConfig:
    layers: int
    dim: int
    tie: bool = True
    # Fixed in the reference code, not in config.json.
    num_heads: int = 32
    num_kv_heads: int = 8
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class LFM2AudioConfig:
    """Top-level ``config.json`` of LFM2-Audio / LFM2.5-Audio."""

    codebooks: int
    interleaved_n_text: int
    interleaved_n_audio: int
    preprocessor: PreprocessorConfig
    encoder: EncoderConfig
    lfm: LFM2Config
    depthformer: DepthformerConfig
    architectures: list[str] = field(default_factory=lambda: ["Lfm2AudioForConditionalGeneration"])
    tie_audio_embeddings: bool = False
    semantic_codebook_factor: float = 100.0
    codebook_weight: str = "log"
    text_loss_multiplier: float = 1.0
    audio_loss_multiplier: float = 1.0

    # 2048 Mimi codes plus the end-of-audio code.
    audio_vocab_size: int = 2049

    @classmethod
    def from_dict(cls, data: Any) -> LFM2AudioConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config.json: expected an object, got {type(data).__name__}")
        data = dict(data)
        sections = {
            "preprocessor": PreprocessorConfig,
            "encoder": EncoderConfig,
            "lfm": LFM2Config,
            "depthformer": DepthformerConfig,
        }
        for name, section_cls in sections.items():
            if name not in data:
                raise ConfigError(f"config.json: missing required key {name!r}")
            data[name] = parse_section(section_cls, data[name], f"config.json[{name!r}]")
        data.pop("audio_vocab_size", None)
        return parse_section(cls, data, "config.json")

    @classmethod
    def from_file(cls, path: str | Path) -> LFM2AudioConfig:
        return cls.from_dict(read_json(path))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
