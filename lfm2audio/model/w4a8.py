"""The AVX2 int4 x int8 product (``w4a8.c``): built on first use, loaded with ctypes, called as a torch op.

PyTorch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) converts each weight to bf16 before it
multiplies; on an AVX2 CPU that reads ~7 GB/s of packed weights, so an int4 model was *slower* than an
int8 one there. This kernel multiplies the 4-bit codes with int8 activations in integer arithmetic and
reads its weights at about the memory's speed (measured by ``bench/bench_quant_kernels.py``). It has
the same weights as the ATen layout (``pack`` takes ``quantize_int4``'s codes and scales); what it adds is
int8 activations, quantized per row and group of the weights (error ~0.6% of a layer's output against
the exact product, where int4 weights alone are ~10%).

The C source is compiled once per source with the system's C compiler (``$CC``, else ``cc``) into
``$LFM2AUDIO_KERNEL_CACHE`` (default ``~/.cache/lfm2audio/kernels``), as ``torch.compile`` does for its
own kernels; the flags name no particular CPU (``-mavx2 -mfma``), so a library built once serves any
AVX2 machine (the CPU container image ships one). Where that cannot work (not x86-64, no AVX2, no compiler) or
``LFM2AUDIO_INT4_KERNEL=aten`` is set, :func:`available` is False and int4 layers use PyTorch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("w4a8.c")
CHUNK = 64  # input features per 32 packed bytes; K and the group size must be multiples of it
# -ffp-contract=off: no fused multiply-adds but the written ones, so a row's bits never depend on the batch.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
ENV_KERNEL = "LFM2AUDIO_INT4_KERNEL"  # "aten": int4 layers use PyTorch's kernel even where this one works


def cache_dir() -> Path:
    if env := os.environ.get("LFM2AUDIO_KERNEL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lfm2audio" / "kernels"


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def library_path() -> Path:
    """Where the kernel for this source and these flags is (or will be) built: a name per content."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    return cache_dir() / f"w4a8-{digest}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile under a temporary name and rename, so that concurrent processes never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.chmod(tmp, 0o755)  # mkstemp makes it private; a shared cache (a container image's) is read by others
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with a warning saying why) where it cannot be built here. A library
    already in the cache needs no compiler (a container image can ship it built)."""
    if not _cpu_has_avx2():
        return None
    target = library_path()
    try:
        if not target.exists():
            compiler = os.environ.get("CC") or "cc"
            if shutil.which(compiler) is None:
                warnings.warn(f"no C compiler ({compiler!r}): int4 layers use PyTorch's slower kernel", stacklevel=3)
                return None
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"could not build or load {target} ({detail}): int4 layers use PyTorch's kernel", stacklevel=3)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.w4a8_linear.argtypes = [p, i64, i64, p, p, p, i64, i64, p, ctypes.c_int]
    lib.w4a8_linear.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether int4 layers can use this kernel here (see the module's docstring)."""
    return os.environ.get(ENV_KERNEL, "").lower() != "aten" and _library() is not None


def fits(in_features: int, group_size: int) -> bool:
    return group_size % CHUNK == 0 and in_features % group_size == 0


def pack(q: Tensor, scales_and_zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's (weight, scales, corr) for int4 codes ``q`` (out, in) in [0, 15] and the ATen layout's
    bf16 ``scales_and_zeros`` (in / group_size, out, 2), where a weight is (q - 8) * scale + zero."""
    out_features, in_features = q.shape
    codes = q.to(torch.uint8).reshape(out_features, in_features // CHUNK, 2, CHUNK // 2)
    weight = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(out_features, in_features // 2)
    scales = scales_and_zeros[..., 0].float().t().contiguous()
    corr = (scales_and_zeros[..., 1].float().t() - 8 * scales).contiguous()
    return weight, scales, corr


def unpack(weight: Tensor, scales: Tensor, corr: Tensor) -> Tensor:
    """The float32 weights (out, in) a packed layer multiplies with (for tests and error figures)."""
    out_features, in_features = weight.shape[0], weight.shape[1] * 2
    chunks = weight.reshape(out_features, in_features // CHUNK, CHUNK // 2)
    q = torch.stack([chunks & 15, chunks >> 4], 2).reshape(out_features, scales.shape[1], -1).float()
    return (q * scales[..., None] + corr[..., None]).reshape(out_features, in_features)


def matmul(x: Tensor, weight: Tensor, scales: Tensor, corr: Tensor) -> Tensor:
    """float32 (rows, out) = x (rows, in) @ the packed layer's weights.T, x float32 and contiguous.
    A decode step makes a few hundred of these calls: each does only what it must (~10 us beside the
    kernel; the custom op below adds ~10 more, so eager code calls this directly)."""
    lib = _library()
    assert lib is not None, "w4a8.matmul called where available() is False"
    rows, in_features = x.shape
    out_features, groups = scales.shape
    # The kernel reads raw memory: operands of another dtype or shape (a module cast with .to(dtype),
    # say) would be read out of bounds, so they are refused here.
    if not (
        x.dtype == scales.dtype == corr.dtype == torch.float32
        and weight.dtype == torch.uint8
        and weight.shape == (out_features, in_features // 2)
        and corr.shape == scales.shape
        and in_features % groups == 0
        and (in_features // groups) % CHUNK == 0
        and x.is_contiguous()
        and weight.is_contiguous()
        and scales.is_contiguous()
        and corr.is_contiguous()
    ):
        raise ValueError(
            f"w4a8.matmul: got x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}, "
            f"scales {scales.dtype} {tuple(scales.shape)}, corr {corr.dtype} {tuple(corr.shape)}; expected "
            "contiguous float32 x (rows, in), uint8 weight (out, in / 2), float32 scales and corr (out, groups)"
        )
    y = torch.empty((rows, out_features), dtype=torch.float32)
    if rows == 0:
        return y
    ptrs = (x.data_ptr(), rows, in_features, weight.data_ptr(), scales.data_ptr(), corr.data_ptr())
    if lib.w4a8_linear(*ptrs, out_features, in_features // groups, y.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"w4a8_linear: no memory for {rows} quantized rows of {in_features}")
    return y


# The same product as an op that torch.compile puts in its graph as it is (lfm2audio.model.compiled).
@torch.library.custom_op("lfm2audio::w4a8_linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, scales: Tensor, corr: Tensor) -> Tensor:
    return matmul(x, weight, scales, corr)


@linear.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor, corr: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
