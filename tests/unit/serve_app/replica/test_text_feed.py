"""A computation's text feed: pieces pushed from another thread reach a request that follows
the feed, one that joins late reads them all, and pushes nobody follows do not wake the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve_app.replica.streaming import TextFeed


def push_from_a_thread(feed: TextFeed, pieces: list[str]) -> None:
    thread = threading.Thread(target=lambda: [feed.push_threadsafe(piece) for piece in pieces])
    thread.start()
    thread.join()


@pytest.mark.asyncio
async def test_pushes_nobody_follows_do_not_wake_the_loop(monkeypatch) -> None:
    feed = TextFeed()
    loop = asyncio.get_running_loop()
    woken: list[object] = []
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *args: woken.append(args))
    push_from_a_thread(feed, ["a", "b", "c"])
    assert feed.pieces == ["a", "b", "c"]
    assert woken == []


@pytest.mark.asyncio
async def test_a_follower_joining_late_reads_every_piece() -> None:
    feed = TextFeed()
    push_from_a_thread(feed, ["a", "b"])
    await asyncio.wait_for(feed.grown_past(1), 1)  # returns at once: two pieces are there
    assert feed.pieces == ["a", "b"]


@pytest.mark.asyncio
async def test_a_waiting_follower_is_woken_by_each_push() -> None:
    feed = TextFeed()
    for count in range(20):
        waiting = asyncio.ensure_future(feed.grown_past(count))
        await asyncio.sleep(0)  # the follower is waiting before the push
        push_from_a_thread(feed, [str(count)])
        await asyncio.wait_for(waiting, 1)
    assert feed.pieces == [str(count) for count in range(20)]
