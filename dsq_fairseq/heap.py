"""Keep freed host memory for reuse (glibc ``mallopt``) so large temporaries don't page-fault.

glibc's ``malloc`` serves every request above ``M_MMAP_THRESHOLD`` (128 KiB at start, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``; the next
tensor of that size then takes one page fault per 4 KiB page, and zeroing those pages costs more
than the work done on them. DSQ training on CPU creates many tensor-sized temporaries per GEMM
(quantized operands, unpacked stashes, quantized gradients): measured on this project's 2-core
machine, a BFP pair quantization of a ``[4096, 512]`` fp32 tensor into two fresh outputs takes
5.3 ms with glibc's defaults and 0.63 ms with reuse; ``2 * x`` of a ``[512, 8, 2400]`` logits
tensor 9.6 -> 2.1 ms. :func:`reuse_freed_memory` raises the mmap threshold to 1 GiB and the trim
threshold to 1 GiB: freed chunks stay in the heap and later tensors of similar size reuse their
already-mapped pages. The price: the process keeps up to its peak heap mapped (no early return
of freed memory to the OS). It changes the whole process's allocator, which is why the DSQ task
applies it (on by default; ``--dsq-no-heap-reuse`` turns it off) and importing the plugin
does not. Other C libraries (musl, macOS): nothing to do, returns ``False``.
The same setting from the environment: ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=1073741824`` (what ``benchmarks/train_speed.py`` gives every
configuration, the FP32 baseline included, so that both sides run on the same allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
REUSE_BYTES = 1 << 30
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(REUSE_BYTES),
               "MALLOC_TRIM_THRESHOLD_": str(REUSE_BYTES)}
"""The environment variables that set the same thresholds at process start (glibc)."""

_applied = False


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to 1 GiB for this process (idempotent); ``True`` if
    they are in force, ``False`` where the C library is not glibc or refused them."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, REUSE_BYTES))
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = True
        logger.info("glibc malloc: mmap/trim thresholds 1 GiB (freed memory kept for reuse; "
                    "--dsq-no-heap-reuse turns this off)")
    return ok


__all__ = ["ENVIRONMENT", "reuse_freed_memory"]
