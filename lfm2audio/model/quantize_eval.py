"""How far a quantized model is from float32, on a teacher-forced stream.

With random weights a greedy stream diverges after a few tokens for any perturbation, so streams
are not compared. Instead the same token stream (the float32 model's) is fed to both models and
what each predicts at every position is compared: the residual stream after each backbone layer,
the text logits, and the depthformer's logits for audio frames (its previous codes forced too).
Used by ``tests/test_quantize.py`` (tiny model) and ``bench/bench_model.py`` (full size).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lfm2audio.model.lfm2_audio import LFM2AudioNetwork as LFM2AudioModel


def stream_embeddings(model: LFM2AudioModel, steps: Tensor) -> Tensor:
    """(1, n, hidden) backbone inputs of a stream ``steps`` (n, 8): a text token in column 0 and -1
    elsewhere, or an audio frame's 8 codes (the golden ``gen.*.steps`` layout)."""
    is_text = steps[:, 1] < 0
    out = torch.empty((steps.shape[0], model.config.lfm.hidden_size), dtype=model.dtype, device=model.device)
    out[is_text] = model.embed_text(steps[is_text, 0].to(model.device))
    out[~is_text] = model.embed_audio_frames(steps[~is_text].to(model.device))
    return out[None]


@torch.inference_mode()
def depth_logits_forced(model: LFM2AudioModel, hidden: Tensor, codes: Tensor) -> Tensor:
    """(B, codebooks, vocab) depthformer logits for states (B, hidden) with the previous codes forced."""
    B = hidden.shape[0]
    C, dim = model.depthformer.codebooks, model.depthformer.cfg.dim
    inputs = model.depth_linear(hidden).view(B, C, dim)
    caches = model.depthformer.new_caches(B, hidden.device, hidden.dtype)
    prev = torch.zeros(B, dim, device=hidden.device, dtype=hidden.dtype)
    logits = []
    for k in range(C):
        out = model.depthformer.step(inputs[:, k] + prev, caches, k)
        logits.append(model.depth_embeddings[k].logits(out).float())
        prev = model.depth_embeddings[k].embedding(codes[:, k].clamp(max=model.config.audio_vocab_size - 1))
    return torch.stack(logits, 1)


@torch.inference_mode()
def teacher_forced(model: LFM2AudioModel, prompt: Tensor, steps: Tensor) -> dict[str, Tensor]:
    """What ``model`` predicts for each entry of ``steps`` (n, 8) after embeddings ``prompt`` (1, P, hidden).

    Returns ``layers`` (n_layers, n, hidden): the residual stream after each layer's operator, at the
    positions that predict the stream; ``text_logits`` (n, vocab); ``depth_logits`` (n_audio, 8,
    audio vocab) at the audio entries.
    """
    P = prompt.shape[1]
    x = torch.cat([prompt, stream_embeddings(model, steps[:-1])], 1)
    layers: list[Tensor] = []
    hooks = [
        blk.ffn_norm.register_forward_hook(lambda _m, args, _out: layers.append(args[0][0, P - 1 :].float()))
        for blk in model.lfm.layers
    ]
    try:
        hidden, _ = model.lfm(x)
    finally:
        for h in hooks:
            h.remove()
    h = hidden[0, P - 1 :]
    audio = steps[:, 1] >= 0
    return {
        "layers": torch.stack(layers),
        "text_logits": model.text_logits(h).float(),
        "depth_logits": depth_logits_forced(model, h[audio], steps[audio].to(h.device)),
    }


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def compare(test: dict[str, Tensor], ref: dict[str, Tensor], steps: Tensor) -> dict[str, Any]:
    """Cosine similarity, relative error and top-1 agreement of ``test`` against ``ref`` (both from
    :func:`teacher_forced` on the same ``steps``).

    ``top1`` is per position of the stream: a text entry agrees when the text argmax does, an audio
    entry when all 8 forced codebook argmaxes do. ``text_top1`` compares the text argmax at every
    position; ``audio_code_top1`` each codebook of each audio entry.
    """
    is_text = steps[:, 1] < 0
    text_same = test["text_logits"].argmax(-1) == ref["text_logits"].argmax(-1)
    codes_same = test["depth_logits"].argmax(-1) == ref["depth_logits"].argmax(-1)
    per_position = text_same.clone()
    per_position[~is_text] = codes_same.all(-1)
    text_cos = _cos(test["text_logits"], ref["text_logits"])
    depth_cos = _cos(test["depth_logits"].flatten(0, 1), ref["depth_logits"].flatten(0, 1))
    return {
        "positions": int(steps.shape[0]),
        "audio_positions": int((~is_text).sum()),
        "layer_cos_mean": [float(_cos(t, r).mean()) for t, r in zip(test["layers"], ref["layers"], strict=True)],
        "layer_rel_err": [_rel(t, r) for t, r in zip(test["layers"], ref["layers"], strict=True)],
        "text_logits_cos_mean": float(text_cos.mean()),
        "text_logits_cos_min": float(text_cos.min()),
        "text_logits_rel_err": _rel(test["text_logits"], ref["text_logits"]),
        "depth_logits_cos_mean": float(depth_cos.mean()) if depth_cos.numel() else None,
        "depth_logits_cos_min": float(depth_cos.min()) if depth_cos.numel() else None,
        "depth_logits_rel_err": _rel(test["depth_logits"], ref["depth_logits"]) if depth_cos.numel() else None,
        "top1": float(per_position.float().mean()),
        "text_top1": float(text_same.float().mean()),
        "audio_code_top1": float(codes_same.float().mean()) if codes_same.numel() else None,
    }
