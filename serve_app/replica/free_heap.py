"""Giving the heap that freed weights leave behind back to the operating system.

glibc's malloc keeps the pages of freed blocks for later allocations rather than returning
them, so a replica that drops a model's weights (an old version drained after a publish, a
model evicted from its pool) stays as large as it was with both in memory: tens of MB that it
no longer uses. `malloc_trim(0)` returns the free pages. Other C libraries (macOS, musl) have
no `malloc_trim`; there `return_free_heap` does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into the process, libc's among them
    except (OSError, TypeError):  # TypeError: Windows needs a library name
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def return_free_heap() -> bool:
    """Give the free pages of every malloc arena back to the operating system; True when some
    memory went back, False when none did or the C library cannot (then nothing happened).

    It walks the whole heap and takes milliseconds, during which ctypes lets other threads run:
    call it off the event loop, after the memory to return was freed.
    """
    trim = _malloc_trim()
    return trim is not None and trim(0) == 1
