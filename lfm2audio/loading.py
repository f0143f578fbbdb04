"""Finding and loading checkpoints: local folders or Hub repos, safetensors only.

Weights are read with safetensors (memory-mapped), cast once to the target
dtype and assigned into a model built on the ``meta`` device, so loading costs
no throw-away random initialisation and peaks close to the weights' size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from lfm2audio.config import LFM2AudioConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DETOKENIZER_DIR = "audio_detokenizer"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(RuntimeError):
    """A checkpoint folder or file that does not hold what the model needs."""


def resolve_model_dir(repo_id_or_path: str | Path, *, revision: str | None = None) -> Path:
    """A local folder as is; anything else is a Hub repo id fetched with huggingface_hub.

    snapshot_download honours HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE, so an
    already-downloaded model loads offline.
    """
    path = Path(repo_id_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError("revision only applies to Hub repos, not to a local folder")
        return path
    if isinstance(repo_id_or_path, Path) or str(repo_id_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(repo_id_or_path), revision=revision))


def default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def safetensors_path(folder: Path, name: str) -> Path:
    """The safetensors file ``name`` in ``folder``; a pickle checkpoint in its place is refused."""
    path = folder / name
    if path.is_file():
        return path
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{folder}: no {name}, only pickle checkpoint(s) {pickles}; lfm2audio loads safetensors only "
            "(unpickling can run arbitrary code). Convert the weights to safetensors first."
        )
    raise CheckpointError(f"{folder}: missing {name}")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], where: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{len(items)} {title}: {shown}")
    raise CheckpointError(f"{where} does not match the model: " + "; ".join(parts))


def assign_weights(
    model: nn.Module, weights: Mapping[str, Tensor], *, device: torch.device, dtype: torch.dtype, where: str
) -> None:
    """Load ``weights`` into a meta-device ``model`` strictly; floating tensors become ``dtype``."""
    expected = model.state_dict(keep_vars=True)
    check_state_dict(expected, weights, where)
    converted = {}
    for name, tensor in weights.items():
        target = dtype if tensor.is_floating_point() else expected[name].dtype
        converted[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(converted, strict=True, assign=True)
    # Non-persistent buffers (RoPE tables, windows) are not in the file: rebuild them where the weights now live.
    for module in model.modules():
        init = getattr(module, "init_buffers", None)
        if callable(init):
            init()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{where}: tensors left uninitialised after loading: {leftover[:10]}")


def load_model(
    repo_id_or_path: str | Path,
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Build an ``LFM2AudioModel`` from a folder or Hub repo in the official layout."""
    from lfm2audio.model.lfm2_audio import LFM2AudioModel

    folder = resolve_model_dir(repo_id_or_path, revision=revision)
    config = LFM2AudioConfig.from_file(folder / "config.json")
    dev = default_device(device)
    dt = default_dtype(dev, dtype)
    weights = read_safetensors(safetensors_path(folder, MODEL_FILE))
    with torch.device("meta"):
        model = LFM2AudioModel(config)
    assign_weights(model, weights, device=dev, dtype=dt, where=str(folder / MODEL_FILE))
    model.retie()
    del weights
    return model.eval()
