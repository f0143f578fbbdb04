"""Finding and loading checkpoints: local folders or Hub repos, safetensors only.

Weights are read with safetensors (memory-mapped), cast once to the target
dtype and assigned into a model built on the ``meta`` device, so loading costs
no throw-away random initialisation and peaks close to the weights' size.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from lfm2audio.config import LFM2AudioConfig
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork
from lfm2audio.model.quantize import (
    DEFAULT_GROUP_SIZE,
    Quantize,
    check_quantize,
    join_projections,
    joinable_groups,
    quantize_tied_heads,
    quantized_linear,
    quantized_module_names,
    rotated_input,
)

N = TypeVar("N", bound=LFM2AudioNetwork)

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


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


_STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_converted(
    path: Path, dtypes: Mapping[str, torch.dtype | None], device: torch.device, group_bytes: int = 256 << 20
) -> Iterator[tuple[str, Tensor]]:
    """Yield each tensor of ``path`` as an owned tensor of ``dtypes[name]`` on ``device`` (None: the
    file's own float dtype, float32 for any other).

    The file is memory-mapped in groups of about ``group_bytes`` and each map is
    closed before the next is opened, so loading never holds the file and the
    converted weights at once (float32 from a bf16 file peaks near the weights' size).
    """
    names = list(safetensors_shapes(path))
    i = 0
    while i < len(names):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            taken = 0
            while i < len(names) and taken < group_bytes:
                part = f.get_slice(names[i])
                shape = part.get_shape()
                dtype = dtypes[names[i]] or _STORED_DTYPES.get(part.get_dtype(), torch.float32)
                rows = _rows_per_block(shape, dtype)
                if shape and rows < shape[0]:
                    # A large table (the 65536-row token embedding): converted a block of rows at a
                    # time, so the file's copy and the converted one never coexist in full.
                    out = torch.empty(shape, dtype=dtype, device=device)
                    for a in range(0, shape[0], rows):
                        out[a : a + rows] = part[a : a + rows]
                else:
                    raw = f.get_tensor(names[i])
                    out = raw.to(device=device, dtype=dtype)
                    if out.data_ptr() == raw.data_ptr():
                        out = out.clone()  # do not keep a view into the map
                    del raw
                taken += out.numel() * out.element_size()
                yield names[i], out
                del out
                i += 1


def _rows_per_block(shape: list[int], dtype: torch.dtype, block_bytes: int = 64 << 20) -> int:
    """Rows of a tensor of ``shape`` read at once: all of it unless it exceeds ``block_bytes``."""
    if not shape:
        return 1
    row_bytes = max(1, math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size())
    return max(1, block_bytes // row_bytes) if row_bytes * shape[0] > block_bytes else shape[0]


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Quantizing while loading frees a float temporary per layer between the small quantized tensors
    that stay; without this the freed pages stay counted in the process's RSS (peak +0.15 GB for int8).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: checkpoint {found[k]}, model {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            parts.append(f"{len(items)} {title}: {shown}")
    raise CheckpointError(f"{where} does not match the model: " + "; ".join(parts))


def load_into_meta_model(
    model: nn.Module,
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    quantize: Quantize | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> None:
    """Fill a meta-device ``model`` from safetensors ``path`` strictly; floating tensors become ``dtype``.

    With ``quantize``, the layers of :func:`quantized_module_names` are replaced by quantized ones as
    their weights arrive (read in the file's dtype, quantized, then dropped), one tensor at a time.
    Peak memory then is the quantized weights plus one layer's temporaries and the open map's pages:
    the file is mapped 64 MB at a time (int4 peaked 1.33x its weights with 256 MB maps and float32
    copies on a 2-core Xeon; the issue allows 1.3x). The layers of a joined group (``_joins``) are kept
    as read until the group is complete, then quantized as one.
    """
    where = str(path)
    expected = model.state_dict(keep_vars=True)
    shapes = safetensors_shapes(path)
    check_state_dict({k: tuple(v.shape) for k, v in expected.items()}, shapes, where)
    dtypes: dict[str, torch.dtype | None] = {
        k: dtype if v.is_floating_point() else v.dtype for k, v in expected.items()
    }
    to_quantize = set(quantized_module_names(model)) if quantize else set()
    for owner in to_quantize:
        dtypes[f"{owner}.weight"] = None  # as stored: the quantizers convert a block of rows at a time
    joins = _joins(model, to_quantize)

    def make(weight: Tensor, bias: Tensor | None) -> nn.Module:
        return quantized_linear(weight, bias, quantize, group_size)  # type: ignore[arg-type]

    for name, tensor in read_converted(path, dtypes, device, (64 << 20) if quantize else (256 << 20)):
        owner, _, attr = name.rpartition(".")
        if owner in joins:
            # A part of a joined layer: kept as read until its siblings are in, then quantized with them.
            model.get_submodule(owner)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            del tensor
            joiner_name, joined = joins[owner]
            joiner = model.get_submodule(joiner_name)
            parts = [getattr(joiner, p) for p in joiner.joinable[joined]]
            if all(t.device.type != "meta" for part in parts for t in part.parameters()):
                del parts
                join_projections(joiner, joined, make)
                release_freed_memory()
            continue
        module = model.get_submodule(owner)
        if owner in to_quantize and attr == "weight":
            parent, _, child = owner.rpartition(".")
            new = quantized_linear(  # type: ignore[arg-type]
                tensor, module.bias, quantize, group_size, rotate=rotated_input(owner)
            )
            setattr(model.get_submodule(parent) if parent else model, child, new)
            del tensor, new
            release_freed_memory()
            continue
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor
    # Non-persistent buffers (RoPE tables, windows) are not in the file: rebuild them where the weights now live.
    for module in model.modules():
        init = getattr(module, "init_buffers", None)
        if callable(init):
            init()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{where}: tensors left uninitialised after loading: {leftover[:10]}")


def _joins(model: nn.Module, to_quantize: set[str]) -> dict[str, tuple[str, str]]:
    """{name of a layer to quantize: (its owner's name, the joined layer's name)} for each group of a
    module's ``joinable`` whose layers are all quantized (``lfm2audio.model.quantize.join_projections``)."""
    joins: dict[str, tuple[str, str]] = {}
    for owner_name, _, joined, parts in joinable_groups(model):
        names = [f"{owner_name}.{p}" if owner_name else p for p in parts]
        if all(n in to_quantize for n in names) and not any(rotated_input(n) for n in names):
            joins.update(dict.fromkeys(names, (owner_name, joined)))
    return joins


def load_model(
    repo_id_or_path: str | Path,
    *,
    revision: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cls: type[N] = LFM2AudioNetwork,  # type: ignore[assignment]
    quantize: Quantize | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> N:
    """Build ``cls`` (the network or a subclass) from a folder or Hub repo in the official layout.

    ``quantize`` ("int8" or "int4", CPU only) quantizes the backbone's and the audio head's linear
    layers while loading (see ``lfm2audio.model.quantize``); ``group_size`` is int4's group width.
    """

    dev = default_device(device)
    check_quantize(quantize, dev)
    folder = resolve_model_dir(repo_id_or_path, revision=revision)
    config = LFM2AudioConfig.from_file(folder / "config.json")
    dt = default_dtype(dev, dtype)
    path = safetensors_path(folder, MODEL_FILE)
    with torch.device("meta"):
        model = cls(config)
    load_into_meta_model(model, path, device=dev, dtype=dt, quantize=quantize, group_size=group_size)
    model.retie()
    if quantize:
        quantize_tied_heads(model)
        release_freed_memory()
    return model.eval()
