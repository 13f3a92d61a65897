"""Keep the memory of freed tensors for reuse in a CPU process that trains or attacks.

glibc hands allocations above a threshold (128 KiB to start) to ``mmap`` and gives them
back on ``free``, and trims freed memory at the top of its heap. A training step on the
CPU allocates and frees its activations (megabytes each) every step, so every step maps
fresh pages and the kernel zero-fills them again: measured in a streamed training worker
of the 1M-row benchmark, 10,000-12,600 page faults a second, and none in a worker whose
loading had happened to raise glibc's adaptive threshold first. Raising both thresholds
makes those buffers come from the heap and stay there for the next step.

Memory a process frees stays its own (up to :data:`TRIM_THRESHOLD` at the top of the
heap), so its resident size stays at its peak instead of falling between steps. GPU
tensors are not affected (CUDA has its own caching allocator). Other C libraries (macOS,
musl) are left alone.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap: glibc's largest allowed value on 64-bit
#: systems (32 MiB), above an activation of a batch of 128 32x32 images at 64 channels.
MMAP_THRESHOLD = 32 * 2**20
#: Freed memory at the top of the heap kept for reuse instead of returned to the system.
TRIM_THRESHOLD = 1024 * 2**20


def _glibc():
    """This process's C library if it is glibc (another libc's mallopt may number its
    parameters differently), else None. Looked up among the symbols the process already
    has loaded: no subprocess (``ctypes.util.find_library`` runs ``ldconfig``)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it: the lookup is the check
        return libc
    except (OSError, AttributeError):
        return None


def reuse_freed_memory() -> bool:
    """Set this process's glibc malloc thresholds (see the module docstring); True if set.

    Process-wide and idempotent; call it at the start of a worker or actor that trains,
    attacks or embeds on the CPU. Without glibc it does nothing and returns False.
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("glibc refused the malloc thresholds; training runs with its defaults")
    return done
