"""What a peer backend of the tests answers for a prefix: the leading run it holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def leading_run(blocks: Mapping[bytes, bytes], hashes: Sequence[bytes]) -> list[bytes]:
    """The values of `hashes` from the first, up to the first one `blocks` does not hold."""
    run = []
    for block_hash in hashes:
        if block_hash not in blocks:
            break
        run.append(blocks[block_hash])
    return run
