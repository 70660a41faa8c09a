"""What a streamed answer is made of on a replica: the pieces of text of one computation, shared
by every request streaming it (`TextFeed`), and the events a stream yields (`TextPiece`, then
one `StreamEnd`).

A computation pushes its pieces from its generation thread (`push_threadsafe`); each request
streaming it reads them from the first (`pieces`, `grown_past`), so one that joins late loses
nothing. A push wakes the event loop only once a request waits for the feed to grow: most
computations are followed by no stream, and a wake-up per token takes the interpreter from the
generation thread, which slows the generation (docs/benchmarks.md, `caching_cost`). The order
of the appends and of `_followed` relies on the interpreter lock. An answer from a cache is
streamed in the pieces it was first generated in (`split_pieces`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from serve_app.api.completions import CompletionOutcome


@dataclass(frozen=True)
class TextPiece:
    """The next piece of the answer's text."""

    text: str


@dataclass(frozen=True)
class StreamEnd:
    """The last event of a stream: the whole answer (its text is the pieces put together)."""

    outcome: CompletionOutcome


StreamEvent = TextPiece | StreamEnd


class TextFeed:
    """The pieces of one computation's text so far. Used on one event loop; `push_threadsafe`
    may be called from any thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.pieces: list[str] = []
        self._grown = asyncio.Event()
        self._followed = False
        self.adopted = False
        """Whether a computation pushes into it (a feed nobody adopted stays empty)."""

    def push_threadsafe(self, piece: str) -> None:
        # Appended first, then `_followed` read: a follower sets `_followed` before it reads
        # the length, so either it sees this piece or this push sees it waiting.
        self.pieces.append(piece)
        if self._followed:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()

    async def grown_past(self, count: int) -> None:
        """Return once the feed holds more than `count` pieces (never, if it does not grow)."""
        self._followed = True
        while len(self.pieces) <= count:
            await self._grown.wait()


def split_pieces(text: str, lengths: Sequence[int], start: int = 0) -> Iterator[str]:
    """The pieces of `text` past its first `start` characters, cut at the piece `lengths` it
    was generated in; what the lengths do not cover comes last, as one piece."""
    position = 0
    for length in lengths:
        end = position + length
        if end > start and end <= len(text):
            yield text[max(position, start) : end]
        position = end
    if max(position, start) < len(text):
        yield text[max(position, start) :]
