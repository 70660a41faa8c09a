"""`return_free_heap`: malloc's free pages go back to the system where glibc can, and nothing
happens elsewhere."""

from __future__ import annotations

import platform

import pytest

from serve_app.replica import free_heap
from serve_app.replica.free_heap import return_free_heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_small_blocks_go_back_to_the_system() -> None:
    blocks = [bytearray(1000) for _ in range(50_000)]  # below the mmap threshold: heap pages
    del blocks
    assert return_free_heap()


def test_without_malloc_trim_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(free_heap, "_malloc_trim", lambda: None)
    assert not return_free_heap()
