"""LFM2AudioNetwork: audio encoder + adapter, LFM2 backbone, audio embeddings and depthformer.

The module tree and parameter names are those of the official checkpoint, so
``state_dict()`` has exactly its keys. Loading (``lfm2audio.loading``) and generation
(``lfm2audio.generation``) build on it; ``lfm2audio.audio_model.LFM2AudioModel`` puts
them together as the public class. This file assembles inputs and runs the parts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lfm2audio.config import LFM2AudioConfig
from lfm2audio.model.adapter import AudioAdapter
from lfm2audio.model.conformer import ConformerEncoder
from lfm2audio.model.depthformer import CodebookEmbedding, Depthformer, sample_audio_frame
from lfm2audio.model.lfm2 import LFM2Backbone
from lfm2audio.model.linear import Linear, linear
from lfm2audio.sampling import GREEDY, RowSampling, SamplingParams, sample
from lfm2audio.tokens import LFMModality


def mel_to_embedding_len(frames: int | Tensor) -> int | Tensor:
    """Backbone positions for an audio turn of ``frames`` mel frames: ceil(frames / 8)."""
    return -(frames // -8)


class LFM2AudioNetwork(nn.Module):
    """The network: modules, embeddings and heads (``LFM2AudioModel`` adds loading and generation)."""

    def __init__(self, config: LFM2AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.codebooks = config.codebooks
        hidden = config.lfm.hidden_size
        vocab = config.audio_vocab_size

        self.lfm = LFM2Backbone(config.lfm)
        self.conformer = ConformerEncoder(config.encoder)
        self.audio_adapter = AudioAdapter(config.encoder.output_dim, hidden)
        # Audio-out frames enter the backbone as the sum of 8 rows of this table.
        self.audio_embedding = CodebookEmbedding(hidden, vocab * config.codebooks, 1e-5, config.tie_audio_embeddings)
        self.register_buffer("codebook_offsets", torch.arange(config.codebooks) * vocab)
        self.register_buffer("audio_loss_weights", _audio_loss_weights(config))
        self.depthformer = Depthformer(config.depthformer, config.codebooks)
        self.depth_linear = Linear(hidden, config.depthformer.dim * config.codebooks)
        self.depth_embeddings = nn.ModuleList(
            CodebookEmbedding(config.depthformer.dim, vocab, config.depthformer.norm_eps, config.depthformer.tie)
            for _ in range(config.codebooks)
        )
        # A quantized copy of the tied text head, set by lfm2audio.model.quantize; None: use the embedding.
        self.text_head: nn.Module | None = None

    def retie(self) -> None:
        """Re-establish tied weights (loading assigns each checkpoint key its own tensor)."""
        self.audio_embedding.retie()
        for emb in self.depth_embeddings:
            emb.retie()

    @property
    def device(self) -> torch.device:
        return self.lfm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lfm.embed_tokens.weight.dtype

    # Embeddings --------------------------------------------------------------

    def embed_text(self, tokens: Tensor) -> Tensor:
        return self.lfm.embed_tokens(tokens)

    def embed_audio_frames(self, codes: Tensor) -> Tensor:
        """(..., codebooks) codes -> (..., hidden): sum over codebooks of the offset embeddings."""
        return self.audio_embedding.embedding(codes + self.codebook_offsets).sum(-2, dtype=self.dtype)

    def encode_audio(self, mel: Tensor, mel_lens: Tensor) -> Tensor:
        """Concatenated mel frames (n_mels, sum(lens)) of several turns -> (sum(ceil(lens/8)), hidden).

        The turns are encoded as one zero-padded batch, as the reference does.
        """
        if mel_lens.numel() == 0:
            return mel.new_zeros((0, self.config.lfm.hidden_size), dtype=self.dtype)
        turns = mel.mT.split(mel_lens.tolist())
        padded = nn.utils.rnn.pad_sequence(turns, batch_first=True).mT.to(self.dtype)
        enc, enc_lens = self.conformer(padded, mel_lens.to(padded.device))
        valid = torch.arange(enc.shape[-1], device=enc.device) < enc_lens.unsqueeze(1)
        return self.audio_adapter(enc.mT[valid])

    def embed_inputs(
        self,
        *,
        text: Tensor,
        audio_in: Tensor,
        audio_in_lens: Tensor,
        audio_out: Tensor,
        modality_flag: Tensor,
    ) -> Tensor:
        """The backbone input (1, N, hidden) for a ChatState's five tensors (the reference's ``_prefill``)."""
        check_inputs(self.codebooks, text, audio_in, audio_in_lens, audio_out, modality_flag)
        flags = modality_flag[0]
        out = torch.empty((1, flags.shape[0], self.config.lfm.hidden_size), device=self.device, dtype=self.dtype)
        out[0, flags == LFMModality.TEXT] = self.embed_text(text[0].to(self.device))
        audio = self.encode_audio(audio_in.to(self.device), audio_in_lens.to(self.device))
        out[0, flags == LFMModality.AUDIO_IN] = audio
        frames = audio_out[: self.codebooks].to(self.device).T
        out[0, flags == LFMModality.AUDIO_OUT] = self.embed_audio_frames(frames)
        return out

    # Heads ---------------------------------------------------------------------

    def text_logits(self, hidden: Tensor) -> Tensor:
        """Tied-embedding logits for backbone states (..., hidden)."""
        if self.text_head is not None:
            return self.text_head(hidden)
        return linear(hidden, self.lfm.embed_tokens.weight)

    def sample_audio_frame(
        self, hidden: Tensor, params: SamplingParams = GREEDY, generator: torch.Generator | None = None
    ) -> Tensor:
        """Codes (B, codebooks) for backbone states (B, hidden), one parameter set for all rows."""
        return sample_audio_frame(  # type: ignore[return-value]
            self.depthformer, self.depth_linear, self.depth_embeddings, hidden,
            lambda logits, _k: sample(logits, params, generator),
        )  # fmt: skip

    def sample_audio_frame_rows(self, hidden: Tensor, rows: RowSampling) -> Tensor:
        """Codes (B, codebooks) with per-row parameters and counter-based noise (codebook k is lane k)."""
        u = rows.uniforms(range(self.codebooks)) if rows.k_cap > 1 else None  # none needed when all greedy
        return sample_audio_frame(  # type: ignore[return-value]
            self.depthformer, self.depth_linear, self.depth_embeddings, hidden,
            lambda logits, k: rows.sample(logits, k, None if u is None else u[:, k]),
        )  # fmt: skip

    def audio_frame_logits(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy codes (B, codebooks) and the logits (B, codebooks, vocab) along that path."""
        return sample_audio_frame(  # type: ignore[return-value]
            self.depthformer, self.depth_linear, self.depth_embeddings, hidden,
            lambda logits, _k: logits.argmax(-1), True,
        )  # fmt: skip


def _audio_loss_weights(config: LFM2AudioConfig) -> Tensor:
    # Training-only buffer, kept because the checkpoint carries it.
    n = config.codebooks
    if config.codebook_weight == "log":
        return (torch.linspace(1, 0, n) * math.log(config.semantic_codebook_factor)).exp()
    weights = torch.ones(n)
    weights[0] *= config.semantic_codebook_factor
    return weights


def check_inputs(
    codebooks: int, text: Tensor, audio_in: Tensor, audio_in_lens: Tensor, audio_out: Tensor, modality_flag: Tensor
) -> None:
    """Raise ValueError with what is wrong when the five ChatState tensors do not fit together."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    for name, t, ndim in (
        ("text", text, 2),
        ("audio_in", audio_in, 2),
        ("audio_in_lens", audio_in_lens, 1),
        ("audio_out", audio_out, 2),
        ("modality_flag", modality_flag, 2),
    ):
        need(isinstance(t, Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
        need(t.dim() == ndim, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    need(text.shape[0] == 1, f"text must have shape (1, N), got {tuple(text.shape)}")
    need(modality_flag.shape[0] == 1, f"modality_flag must have shape (1, N), got {tuple(modality_flag.shape)}")
    need(audio_out.shape[0] >= codebooks, f"audio_out must have {codebooks} rows, got {audio_out.shape[0]}")
    need(audio_in.shape[0] == 128, f"audio_in must have 128 mel rows, got {audio_in.shape[0]}")
    flags = modality_flag[0]
    n_text = int((flags == LFMModality.TEXT).sum())
    n_in = int((flags == LFMModality.AUDIO_IN).sum())
    n_out = int((flags == LFMModality.AUDIO_OUT).sum())
    need(n_text + n_in + n_out == flags.shape[0], "modality_flag holds values other than 1, 2 and 3")
    need(n_text == text.shape[1], f"modality_flag has {n_text} text positions but text has {text.shape[1]} tokens")
    need(
        n_out == audio_out.shape[1],
        f"modality_flag has {n_out} audio-out positions but audio_out has {audio_out.shape[1]} frames",
    )
    need(
        int(audio_in_lens.sum()) == audio_in.shape[1],
        f"audio_in_lens sums to {int(audio_in_lens.sum())} but audio_in has {audio_in.shape[1]} frames",
    )
    expected_in = int(mel_to_embedding_len(audio_in_lens).sum()) if audio_in_lens.numel() else 0
    need(n_in == expected_in, f"modality_flag has {n_in} audio-in positions, the audio turns need {expected_in}")
