"""Handing memory that models no longer use back to the operating system."""

import ctypes
import ctypes.util
import gc


def _glibc_malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def free_unreferenced_memory():
    """Collect unreachable objects (cells reference each other in cycles), then return the allocator's free pages.

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MB, the size of most weight tensors) for
    reuse, and the large buffers allocated afterwards cannot use them: dropping 10.6 GB of full-size SDXL models
    lowered the RSS by 4.3 GB, and `malloc_trim` then gave back the rest (measured).
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
