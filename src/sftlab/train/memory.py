"""glibc malloc settings for training: keep freed activations (default) or give them back (low-memory mode).

A training step allocates and frees the same few hundred MB of activations every step, in blocks of 0.1-130 MB.
glibc's malloc serves a block from the heap whenever a free chunk fits, and grows its mmap threshold (up to
32 MB) whenever a big mmapped block is freed, so after the first step nearly every activation lands on the
heap, where blocks of varying sizes fragment it and keep freed memory resident. A fixed threshold (which also
switches the dynamic growth off) gives each big block its own mapping. Measured on the B1 benchmark (58M
Llama, LoRA, 2 threads), 2048-token passes: peak RSS 2,247 -> 1,510 MB; but every step then page-faults its
activations in anew (1.2M minor faults, 2.7 s of system time per step) and the step takes ~2x as long. So it
is off by default; smaller passes (`micro_batch_tokens`) and loss chunks (`loss_chunk_size`) cut the peak
at no speed cost instead.

The default (`perf.malloc_retain`) goes the other way: never trim the heap and fix the mmap threshold at glibc's
32 MB ceiling, so after the first step every activation (and the 33 MB logit chunk) reuses pages already
mapped. With glibc's dynamic thresholds the heap top is trimmed and re-faulted step after step: B1 measured
9-38 thousand minor faults and 0.05-0.17 s of system time per step; retained, ~1,100 faults and 0.03 s, for
+30 MB peak RSS.

Both modes are entered through `malloc_mode` (held by `train/patches.applied` for the length of a fit) and undone
by `restore_malloc` when it ends, since the process may go on (notebooks, sweeps, the test suite).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for the mmap threshold on 64-bit
DEFAULT_MMAP_THRESHOLD = 256 * 1024
GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's own default
GLIBC_TOP_PAD = 128 * 1024  # glibc's own default


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None  # glibc (musl has no mallopt)
    except OSError:
        return None


def trim_heap() -> bool:
    """Hand freed heap pages back to the OS now (glibc malloc_trim); False where there is no glibc."""
    libc = _libc()
    return libc is not None and libc.malloc_trim(0) in (0, 1)


def set_malloc_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Blocks of >= nbytes get their own mmap (returned to the OS on free); True when glibc accepted it."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
    # Trim the heap top as soon as 2x the threshold is free there (the default would be 2x the grown threshold).
    return ok and libc.mallopt(M_TRIM_THRESHOLD, 2 * int(nbytes)) == 1


def retain_freed_memory() -> bool:
    """Freed blocks stay mapped in the heap for the next step's activations; True when glibc accepted it."""
    libc = _libc()
    if libc is None:
        return False
    return (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1  # fixed: also stops the dynamic growth
        and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1  # never give the heap top back
        and libc.mallopt(M_TOP_PAD, 64 * 1024 * 1024) == 1  # grow the heap in 64 MB steps
    )


def restore_malloc() -> bool:
    """Undo either mode: glibc's default trim threshold and top pad, and the mmap threshold at the 32 MB ceiling
    glibc's dynamic threshold climbs to under torch's big blocks (glibc cannot switch the dynamic growth back on
    once a threshold was set); then hand back what is free now."""
    libc = _libc()
    if libc is None:
        return False
    ok = (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        and libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD) == 1
        and libc.mallopt(M_TOP_PAD, GLIBC_TOP_PAD) == 1
    )
    return ok and libc.malloc_trim(0) in (0, 1)


@contextlib.contextmanager
def malloc_mode(mmap_threshold: int | None, retain: bool) -> Iterator[bool]:
    """Low-memory mode (a threshold), retain mode, or neither, for the block; restored after. Yields whether glibc
    took the setting."""
    if mmap_threshold:
        changed = set_malloc_mmap_threshold(mmap_threshold)
    else:
        changed = retain_freed_memory() if retain else False
    try:
        yield changed
    finally:
        if changed:
            restore_malloc()
