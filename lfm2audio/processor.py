"""LFM2AudioProcessor: text tokenizer, log-mel features, and the audio decoders (Mimi, detokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lfm2audio.config import PreprocessorConfig, parse_section, read_json
from lfm2audio.features import LogMelFeatures
from lfm2audio.loading import DETOKENIZER_DIR, MIMI_FILE, default_device, resolve_model_dir
from lfm2audio.model.quantize import Quantize, check_quantize
from lfm2audio.tokenizer import TextTokenizer

MIMI_CONFIG_FILE = "mimi_config.json"


class LFM2AudioProcessor:
    """Converts data and tokens: ``text`` (tokenizer), ``audio`` (log-mel), ``mimi`` / ``decode`` (audio out)."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        preprocessor: PreprocessorConfig,
        *,
        mimi_path: Path | None = None,
        mimi_config_path: Path | None = None,
        detokenizer_path: Path | None = None,
        name: str | None = None,
        quantize: Quantize | None = None,
    ) -> None:
        self.text_tokenizer = tokenizer
        self.audio_processor = LogMelFeatures(preprocessor).eval()
        self.preprocessor = preprocessor
        self.mimi_path = mimi_path
        self.mimi_config_path = mimi_config_path
        self.detokenizer_path = detokenizer_path
        self.name = name
        self.quantize = quantize
        self._mimi: Any = None
        self._detokenizer: Any = None

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | Path,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        quantize: Quantize | None = None,
    ) -> LFM2AudioProcessor:
        """``quantize`` ("int8" or "int4", CPU only) gives Mimi's decoder and the LFM2.5 detokenizer int8
        weights when they load (``lfm2audio.codec.int8``): pass the model's setting."""
        check_quantize(quantize, default_device(device))
        folder = resolve_model_dir(repo_id_or_path, revision=revision)
        config = read_json(folder / "config.json")
        if not isinstance(config, dict) or "preprocessor" not in config:
            from lfm2audio.config import ConfigError

            raise ConfigError(f"{folder / 'config.json'}: missing required key 'preprocessor'")
        pre = parse_section(PreprocessorConfig, config["preprocessor"], "config.json['preprocessor']")
        mimi = folder / MIMI_FILE
        mimi_cfg = folder / MIMI_CONFIG_FILE
        detok = folder / DETOKENIZER_DIR
        return cls(
            TextTokenizer.from_file(folder),
            pre,
            mimi_path=mimi if mimi.is_file() else None,
            mimi_config_path=mimi_cfg if mimi_cfg.is_file() else None,
            detokenizer_path=detok if detok.is_dir() else None,
            name=str(repo_id_or_path),
            quantize=quantize,
        ).to(default_device(device))

    # Reference-compatible surface -------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LFM2AudioProcessor:
        self.audio_processor.to(device=device)
        for m in (self._mimi, self._detokenizer):
            if m is not None:
                m.to(device=device)
        return self

    def eval(self) -> LFM2AudioProcessor:
        return self

    def train(self) -> LFM2AudioProcessor:
        return self

    @property
    def device(self) -> torch.device:
        return self.audio_processor.filterbank.device

    @property
    def text(self) -> TextTokenizer:
        return self.text_tokenizer

    @property
    def audio(self) -> LogMelFeatures:
        return self.audio_processor

    @property
    def mimi(self):
        """The Mimi codec (24 kHz, 12.5 Hz frames of 8 codes), loaded on first use."""
        if self.mimi_path is None:
            raise AttributeError(
                f"model {self.name} has no Mimi weights ({MIMI_FILE}); use {type(self).__name__}.decode instead"
            )
        if self._mimi is None:
            from lfm2audio.codec import MimiConfig, load_mimi

            config = MimiConfig.from_json(self.mimi_config_path) if self.mimi_config_path else None
            self._mimi = self._quantized(load_mimi(self.mimi_path, config=config, device=self.device))
        return self._mimi

    @property
    def audio_detokenizer(self):
        """The LFM2.5 ISTFT detokenizer, when the checkpoint carries ``audio_detokenizer/``."""
        if self.detokenizer_path is None:
            raise AttributeError(
                f"model {self.name} has no LFM2.5 audio detokenizer ({DETOKENIZER_DIR}/); "
                f"use {type(self).__name__}.mimi instead"
            )
        if self._detokenizer is None:
            from lfm2audio.codec.detokenizer import load_detokenizer

            self._detokenizer = self._quantized(load_detokenizer(self.detokenizer_path, device=self.device))
        return self._detokenizer

    def _quantized(self, codec: Any) -> Any:
        """A codec just loaded, with int8 decoder weights when the processor quantizes."""
        if self.quantize is None:
            return codec
        from lfm2audio.codec.int8 import quantize_codec_int8

        check_quantize(self.quantize, self.device)
        return quantize_codec_int8(codec)

    @torch.inference_mode()
    def decode(self, audio_codes: Tensor) -> Tensor:
        """(1, 8, T) codes in [0, 2047] -> (1, T * 1920) 24 kHz waveform through the detokenizer."""
        if torch.any(audio_codes >= 2048) or torch.any(audio_codes < 0):
            raise ValueError("audio codes must be in [0, 2047]; drop the end-of-audio frame (2048) first")
        return self.audio_detokenizer.decode(audio_codes.to(self.device))

    # Features ---------------------------------------------------------------------

    @torch.inference_mode()
    def features(self, wave: Tensor | np.ndarray, sampling_rate: int) -> Tensor:
        """Log-mel features (n_mels, 1 + samples // 160) of one waveform at any rate.

        ``wave`` is (channels, samples) or (samples,); channels are averaged to
        mono, then soxr resamples to the model's rate.
        """
        wave = mono_float(wave)
        if not isinstance(sampling_rate, int) or sampling_rate <= 0:
            raise ValueError(f"sampling_rate must be a positive integer, got {sampling_rate!r}")
        target = self.preprocessor.sample_rate
        if sampling_rate != target:
            wave = resample(wave, sampling_rate, target)
        if wave.shape[0] < self.audio_processor.hop_length:
            raise ValueError(f"audio too short: {wave.shape[0]} samples at {target} Hz")
        x = wave.to(self.device).unsqueeze(0)
        mel, _ = self.audio_processor(x, torch.tensor([x.shape[1]], device=self.device))
        return mel[0]


def mono_float(wave: Tensor | np.ndarray) -> Tensor:
    """(channels, samples) or (samples,) audio as a float32 mono (samples,) tensor."""
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, Tensor):
        raise TypeError(f"wave must be a torch.Tensor or numpy array, got {type(wave).__name__}")
    if wave.dim() == 1:
        wave = wave.unsqueeze(0)
    if wave.dim() != 2:
        raise ValueError(f"wave must be (channels, samples) or (samples,), got shape {tuple(wave.shape)}")
    if wave.shape[0] > wave.shape[1]:
        raise ValueError(f"wave has shape {tuple(wave.shape)}: more channels than samples; pass (channels, samples)")
    if not wave.is_floating_point():
        if wave.dtype == torch.int16:
            wave = wave.float() / 32768.0
        else:
            raise ValueError(f"integer audio must be int16 PCM, got {wave.dtype}")
    return wave.float().mean(0)


def resample(wave: Tensor, rate_in: int, rate_out: int) -> Tensor:
    """Resample mono float audio with soxr (high quality)."""
    import soxr

    out = soxr.resample(wave.detach().cpu().numpy().astype(np.float32), rate_in, rate_out, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out)).to(wave.device)
