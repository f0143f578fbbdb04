"""Optional ``torch.compile`` of the decode hot path: the backbone and the audio frame's depthformer.

Why: on a small CPU a decode step is memory-bound arithmetic plus thousands of small ops, and with
int8 weights the small ops are a third of a chat turn (the full-size int8 model on this project's
2-core CI machine: a backbone step took 54 ms of which 40 ms were the matmul kernels; a depthformer
frame, 8 codebooks through 6 layers plus sampling, 46 ms of which 17.5 ms). Inductor fuses the
elementwise ops and norms into a few C++ loops and replaces the Python-level dispatch by generated
code: measured there, a frame 0.58x, a backbone step about 0.8x the eager time
(``bench/bench_model.py --compile``).

What is compiled:

- The backbone's one-position calls (the decode steps; ``net.lfm.forward`` dispatches on the input's
  length): the number of positions attended changes every step and is traced as dynamic after the
  first change. Prefill chunks stay eager: each chunk length would be another graph to compile, and a
  graph traced with a dynamic length was slower for the one-position steps (0.83-0.90x eager against
  0.80-0.86x for the one-position graph, min of 6 runs of 18 steps, int8).
- The frame methods ``sample_audio_frame`` and ``sample_audio_frame_rows``, each as one graph for the
  whole frame (the 8 codebooks unrolled, with their sampling). Compiling only the depthformer's
  per-codebook step gained 9%: its position becomes a dynamic index and the sampling stays eager.

Options: ``freezing`` (weights become constants of the graph, so inductor can pre-pack them and
fold what depends on them only; inference only, which is all this does).

The cost:

- **Compile time.** Each graph is compiled on its first call: about 100 s for the full-size frame and
  35 s for the backbone step on 2 cores (the tiny checkpoint takes as long). torch caches compiled
  graphs on disk, so a second process reuses them. Row counts other than one compile again (dynamic
  shapes), which is why the batched engine refuses a compiled model.
- **Rounding.** The numbers are computed in another order, so streams are not bit-identical to the
  eager ones. The golden parity holds for the eager model, which stays the default.
- **A C++ compiler** at run time, which inductor's CPU code generation needs (on CUDA it would use
  Triton instead; not measured there).

The W8A8 layers reach the graph as the custom op ``lfm2audio::w8a8_matmul``
(``lfm2audio.model.quantize``); int8/int4 weight-only layers call ATen ops that trace as they are.
"""

from __future__ import annotations

import shutil
from typing import TypeVar

import torch
from torch import Tensor

from lfm2audio.model.lfm2 import LFM2Cache
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork

COMPILE_OPTIONS = {"freezing": True}
FRAME_METHODS = ("sample_audio_frame", "sample_audio_frame_rows")
N = TypeVar("N", bound=LFM2AudioNetwork)


class NoCompilerError(RuntimeError):
    """compile=True on a CPU without a C++ compiler."""


def have_cxx_compiler() -> bool:
    """True when a C++ compiler inductor can use is on the PATH (it looks for these names)."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def is_compiled(net: LFM2AudioNetwork) -> bool:
    return bool(getattr(net, "_decode_compiled", False))


def compile_decode(net: N) -> N:
    """Compile ``net``'s backbone and frame methods in place (see the module docstring); returns ``net``.

    Nothing is compiled until first called. Calling it again does nothing.
    """
    if is_compiled(net):
        return net
    if net.device.type == "cpu" and not have_cxx_compiler():
        raise NoCompilerError("compile=True needs a C++ compiler (g++ or clang++) on the PATH for torch.compile on CPU")
    eager_forward = net.lfm.forward
    step = torch.compile(eager_forward, options=COMPILE_OPTIONS)

    def forward(
        x: Tensor, cache: LFM2Cache | None = None, *, valid: Tensor | None = None, kv_len: int | None = None
    ) -> tuple[Tensor, LFM2Cache | None]:
        if x.shape[1] != 1 or cache is None:
            return eager_forward(x, cache, valid=valid, kv_len=kv_len)
        if kv_len is None:  # read here: a host read inside the graph would break it in two
            kv_len = net.lfm.attended_len(cache, 1, valid)
        return step(x, cache, valid=valid, kv_len=kv_len)

    net.lfm.forward = forward  # nn.Module.__call__ looks forward up on the instance first
    for name in FRAME_METHODS:
        # The compiled bound method shadows the class's on this instance only.
        setattr(net, name, torch.compile(getattr(net, name), options=COMPILE_OPTIONS))
    net._decode_compiled = True
    return net
