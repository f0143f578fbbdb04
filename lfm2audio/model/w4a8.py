"""The int4 x int8 product (``w4a8.c``, AVX2 or AVX-512 VNNI): built on first use, loaded with ctypes,
called as a torch op.

PyTorch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) converts each weight to bf16 before it
multiplies; on an AVX2 CPU that reads ~7 GB/s of packed weights, so an int4 model was *slower* than an
int8 one there. This kernel multiplies the 4-bit codes with int8 activations in integer arithmetic and
reads its weights at about the memory's speed (measured by ``bench/bench_quant_kernels.py``). It has
the same weights as the ATen layout (``pack`` takes ``quantize_int4``'s codes and scales) in tiles of 16
output rows, so that a vector holds 16 outputs; what it adds is int8 activations, quantized per row and
group of the weights (error ~0.6% of a layer's output against the exact product, where int4 weights
alone are ~10%).

Two paths: AVX2 (``vpmaddubsw``), and where the CPU has AVX-512 VNNI (Intel since Cascade Lake, AMD
since Zen 4) ``vpdpbusd``, fewer instructions a weight (1.4x faster at 8 rows on a Zen 4, 1.1x at one); they agree to
float rounding. The fastest is taken (``isa()``); ``LFM2AUDIO_INT4_KERNEL=avx2`` keeps the AVX2 one.

The C source is compiled once per source with the system's C compiler (``$CC``, else ``cc``) into
``$LFM2AUDIO_KERNEL_CACHE`` (default ``~/.cache/lfm2audio/kernels``), as ``torch.compile`` does for its
own kernels; the flags name no particular CPU (``-mavx2 -mfma``; the VNNI path is a per-function target
chosen at run time), so a library built once serves any AVX2 machine (the CPU container image ships one).
Where that cannot work (not x86-64, no AVX2, no compiler) or ``LFM2AUDIO_INT4_KERNEL=aten`` is set,
:func:`available` is False and int4 layers use PyTorch's kernel.
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
TILE = 16  # output rows per tile of the packed layout (the last tile is padded with zero rows)
FEATURES = 8  # input features per 4-byte unit of a tile row; the group size must be a multiple of it
TILE_ROW_BYTES = TILE * FEATURES // 2  # a tile's bytes for each FEATURES inputs: one 64-byte vector
# -ffp-contract=off: no fused multiply-adds but the written ones, so a row's bits never depend on the batch.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
ENV_KERNEL = "LFM2AUDIO_INT4_KERNEL"  # "aten": int4 layers use PyTorch's kernel; "avx2": not the VNNI path
ISA_CODES = {"avx2": 1, "avx512vnni": 2}


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
    lib.w4a8_linear.argtypes = [p, i64, i64, p, p, p, i64, i64, p, ctypes.c_int, ctypes.c_int]
    lib.w4a8_linear.restype = ctypes.c_int
    lib.w4a8_cpu_isa.restype = ctypes.c_int
    return lib


def cpu_isas() -> list[str]:
    """The kernel's paths this CPU can run, slowest first (empty where the kernel is unavailable)."""
    lib = _library()
    if lib is None:
        return []
    return [name for name, code in ISA_CODES.items() if code <= lib.w4a8_cpu_isa()]


@functools.cache
def _default_isa() -> int:
    isas = cpu_isas()
    if os.environ.get(ENV_KERNEL, "").lower() == "avx2":
        return ISA_CODES["avx2"]
    return ISA_CODES[isas[-1]] if isas else ISA_CODES["avx2"]


def isa() -> str:
    """The path products take here: "avx512vnni" where the CPU has it (unless ``LFM2AUDIO_INT4_KERNEL=avx2``),
    else "avx2"."""
    return {code: name for name, code in ISA_CODES.items()}[_default_isa()]


def available() -> bool:
    """Whether int4 layers can use this kernel here (see the module's docstring)."""
    return os.environ.get(ENV_KERNEL, "").lower() != "aten" and _library() is not None


def fits(in_features: int, group_size: int) -> bool:
    return group_size % FEATURES == 0 and in_features % group_size == 0


def tiles(out_features: int) -> int:
    return -(-out_features // TILE)


def pack(q: Tensor, scales_and_zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's (weight, scales, corr) for int4 codes ``q`` (out, in) in [0, 15] and the ATen layout's
    bf16 ``scales_and_zeros`` (in / group_size, out, 2), where a weight is (q - 8) * scale + zero.

    weight is uint8 (tiles, in / 8, 64): for each tile of 16 output rows and each 8 input features, byte
    4 * o + i holds row o's codes of features i (low nibble) and 4 + i (high nibble); scales and corr are
    float32 (tiles, groups, 16). Rows past ``out`` in the last tile are zero (they give zero outputs)."""
    out_features, in_features = q.shape
    n_tiles, pad = tiles(out_features), -out_features % TILE
    scales = scales_and_zeros[..., 0].float().t()
    corr = scales_and_zeros[..., 1].float().t() - 8 * scales
    codes = torch.nn.functional.pad(q.to(torch.uint8), (0, 0, 0, pad))
    codes = codes.reshape(n_tiles, TILE, in_features // FEATURES, 2, FEATURES // 2)
    weight = (codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
    weight = weight.reshape(n_tiles, in_features // FEATURES, TILE_ROW_BYTES).contiguous()

    def by_tile(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(n_tiles, TILE, -1).transpose(1, 2).contiguous()

    return weight, by_tile(scales), by_tile(corr)


def unpack(weight: Tensor, scales: Tensor, corr: Tensor, out_features: int) -> Tensor:
    """The float32 weights (out, in) a packed layer multiplies with (for tests and error figures)."""
    n_tiles, units = weight.shape[0], weight.shape[1]
    b = weight.reshape(n_tiles, units, TILE, FEATURES // 2)
    q = torch.stack([b & 15, b >> 4], 3).permute(0, 2, 1, 3, 4).reshape(n_tiles * TILE, units * FEATURES).float()
    groups = scales.shape[1]
    scale = scales.transpose(1, 2).reshape(n_tiles * TILE, groups, 1)
    zero = corr.transpose(1, 2).reshape(n_tiles * TILE, groups, 1)
    w = (q.reshape(n_tiles * TILE, groups, -1) * scale + zero).reshape(n_tiles * TILE, units * FEATURES)
    return w[:out_features]


def matmul(
    x: Tensor, weight: Tensor, scales: Tensor, corr: Tensor, out_features: int, isa: str | None = None
) -> Tensor:
    """float32 (rows, out_features) = x (rows, in) @ the packed layer's weights.T, x float32 and contiguous;
    ``isa`` picks a path (for tests), by default the fastest this CPU has (:func:`isa`).
    A decode step makes a few hundred of these calls: each does only what it must (~10 us beside the
    kernel; the custom op below adds ~10 more, so eager code calls this directly)."""
    lib = _library()
    assert lib is not None, "w4a8.matmul called where available() is False"
    rows, in_features = x.shape
    n_tiles, groups, _ = scales.shape
    # The kernel reads raw memory: operands of another dtype or shape (a module cast with .to(dtype),
    # say) would be read out of bounds, so they are refused here.
    if not (
        x.dtype == scales.dtype == corr.dtype == torch.float32
        and weight.dtype == torch.uint8
        and weight.shape == (n_tiles, in_features // FEATURES, TILE_ROW_BYTES)
        and scales.shape == corr.shape == (n_tiles, groups, TILE)
        and tiles(out_features) == n_tiles
        and in_features % groups == 0
        and (in_features // groups) % FEATURES == 0
        and x.is_contiguous()
        and weight.is_contiguous()
        and scales.is_contiguous()
        and corr.is_contiguous()
    ):
        raise ValueError(
            f"w4a8.matmul: got x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}, "
            f"scales {scales.dtype} {tuple(scales.shape)}, corr {corr.dtype} {tuple(corr.shape)} for "
            f"{out_features} outputs; expected contiguous float32 x (rows, in), uint8 weight (tiles, in / 8, 64), "
            "float32 scales and corr (tiles, groups, 16)"
        )
    code = _default_isa() if isa is None else ISA_CODES[isa]
    y = torch.empty((rows, out_features), dtype=torch.float32)
    if rows == 0:
        return y
    ptrs = (x.data_ptr(), rows, in_features, weight.data_ptr(), scales.data_ptr(), corr.data_ptr())
    if lib.w4a8_linear(*ptrs, out_features, in_features // groups, y.data_ptr(), torch.get_num_threads(), code):
        raise MemoryError(f"w4a8_linear: no memory for {rows} quantized rows of {in_features}")
    return y


# The same product as an op that torch.compile puts in its graph as it is (lfm2audio.model.compiled).
@torch.library.custom_op("lfm2audio::w4a8_linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, scales: Tensor, corr: Tensor, out_features: int) -> Tensor:
    return matmul(x, weight, scales, corr, out_features)


@linear.register_fake
def _(x: Tensor, weight: Tensor, scales: Tensor, corr: Tensor, out_features: int) -> Tensor:
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)
