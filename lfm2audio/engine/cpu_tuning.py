"""CPU settings of the engine's process: freed memory kept for the next step, per-thread intra-op threads.

**Freed memory.**

An engine step on the CPU allocates and frees the same large temporaries every
step (a hundred rows of audio at 24 kHz, logits over the vocabulary). glibc
serves every allocation above its mmap threshold (128 KiB at first, raised
dynamically up to 32 MiB only after such blocks are freed) with a fresh
``mmap``, and returns the heap's free top to the system above its trim
threshold: either way the memory comes back zeroed, one page fault per 4 KiB
on first touch. At a hundred rows that fault cost was as large as the
arithmetic of the audio decoder itself (``bench/bench_engine_overhead.py``).

``retain_freed_memory`` sets both thresholds once (``mallopt``) so blocks up to
``mmap_threshold`` come from the heap and up to ``trim_threshold`` bytes of
freed heap stay mapped for the next step. It affects the whole process; it does
nothing off glibc, and nothing when ``LFM2AUDIO_MALLOC_TUNING=0`` or the usual
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables already choose.

**Threads.** torch's intra-op thread count is per thread under OpenMP (each
thread that runs a parallel op gets its own team of workers), but
``torch.set_num_threads`` also sets the count that threads started later begin
with. ``use_threads_here(n)`` gives the calling thread ``n`` threads and leaves
that default as it was. Why the engine thread needs it: once another thread
(the one that loaded the model, say) owns a team, libgomp sees more of its
threads than cores and stops letting idle workers spin, so every parallel op
of the engine thread waits for a sleeping worker to wake. On the 2-core CI
machine an 8-session step on its own thread took 25-28 ms with 2 threads
after the model was loaded on the main thread, against 10 ms on the main
thread, or on its own thread when the model was loaded by a thread running one
intra-op thread (which leaves no team behind): ``load_without_team(fn)`` loads
that way (so does ``Engine.from_pretrained``), and ``Engine()`` fills its
preallocated state that way too. On a 2-core Xeon (AVX-512) an engine built on
the main thread stepped 1.7-2.2x slower for its whole life. With 1 intra-op
thread the engine thread is never slowed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 256 << 20
DEFAULT_TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_applied: tuple[int, int] | None = None


def retain_freed_memory(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> bool:
    """Apply the thresholds (once per process); True when glibc took them."""
    global _applied
    with _lock:
        if _applied is not None:
            return True
        if os.environ.get("LFM2AUDIO_MALLOC_TUNING", "1") == "0":
            return False
        if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
            return False  # the operator chose already
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
        except (OSError, AttributeError):
            return False
        if ok:
            _applied = (mmap_threshold, trim_threshold)
            log.debug("malloc: mmap threshold %d, trim threshold %d", mmap_threshold, trim_threshold)
        return ok


def use_threads_here(threads: int) -> None:
    """Run the calling thread's torch ops on ``threads`` intra-op threads; other threads keep theirs,
    and threads started later start from the count they would have had (see the module docstring)."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    if threads != default:
        # set_num_threads also changed what new threads start with: a helper thread puts that back.
        helper = threading.Thread(target=torch.set_num_threads, args=(default,))
        helper.start()
        helper.join()


def call_in_thread(threads: int | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a short-lived thread of its own whose torch ops use ``threads`` intra-op
    threads (None: what torch gives new threads); returns its result, or raises its exception here."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if threads is not None:
                use_threads_here(threads)
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=body, name="lfm2audio-call")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def load_without_team(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` (a model load) on a thread that runs torch on one intra-op thread, so that
    it leaves no OpenMP team behind to slow the engine thread (see above)."""
    return call_in_thread(1, fn, *args, **kwargs)
