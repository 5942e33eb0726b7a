"""Process memory settings of a training process: the garbage collector and the C allocator.

``long_lived_frozen``: a training step creates many short-lived containers (routes, gather plans,
autograd contexts of the lego functions); some live through a young collection while the step runs,
and every few steps their count triggers a *full* collection, which traverses every tracked object of
the process: about 340 k in a torch process with GPPF-R50 built, 0.17-0.2 s per full collection on
this project's CPU machines (one in four to six GPPF-R50 steps of 2.7-5 s; the dense ResNet-50 step,
which creates fewer objects, triggered none). ``gc.freeze()`` moves the objects alive now to a
permanent generation that collections skip, so the same full collection takes under 1 ms; garbage
collection stays on.

``keep_freed_memory``: torch's CPU tensors come from the C allocator. glibc's ``malloc`` serves large
blocks (activations, gradients, gathered weights: up to tens of MB) by ``mmap`` and gives them back
to the kernel on ``free``, so every step maps them again and the kernel faults in and zeroes every
page: measured at 224 px, batch 16, bf16, one thread, 72-93 k page faults and 0.15-0.24 s of system
time per 2.7-2.9 s step, for torchvision's ResNet-50 as for GPPF-R50. Keeping freed memory in the heap
for reuse removes both (jemalloc and tcmalloc, the allocators PyTorch's CPU tuning guide recommends,
also hold freed memory for reuse instead of unmapping it at once). The ``gppf`` command applies it at
start-up; Python API users call it themselves.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from typing import Iterator, Mapping

# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_NEVER = 2**31 - 1  # (mallopt takes an int)
# explicit allocator settings of the user (glibc environment variables, tunables, a preloaded malloc)
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")
OPT_OUT = "GPPF_KEEP_FREED_MEMORY"  # "0": leave the C allocator as it is


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Collect, then exclude every object alive now (imported modules, model, optimizer state, datasets)
    from garbage collection while the block runs; unfrozen after it, unless an enclosing block froze
    first (then that block unfreezes). Objects created inside are collected as usual."""
    outermost = gc.get_freeze_count() == 0
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        if outermost:
            gc.unfreeze()


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process (and the processes it forks):
    no ``mmap`` for large blocks, no trimming of the heap. Returns whether it did.

    Nothing is done (``False``) on a C library other than glibc, when ``environ`` (default
    ``os.environ``) sets ``GPPF_KEEP_FREED_MEMORY=0``, glibc's own ``MALLOC_*_`` variables or
    ``GLIBC_TUNABLES``, or preloads another allocator (``LD_PRELOAD``): explicit settings win.
    The process's resident memory then stays at its peak instead of shrinking between steps.
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1") == "0" or any(k in env for k in _USER_SETTINGS) or "malloc" in env.get("LD_PRELOAD", ""):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: the parameters are glibc's
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
