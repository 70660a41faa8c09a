"""Prefix chunks as envelopes: bit-exact round trips, and a valid value refused when it is not
the one asked for (other hashes, model, version or secret)."""

import asyncio
import os
import sys
import threading

import pytest
import torch

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.codec import CodecError
from cluster.secret import ClusterSecret
from cluster.sharing import tiered_prefix
from cluster.sharing.tiered_prefix import (
    SHARING_NICENESS,
    decode_chunk,
    decode_leading_chunk,
    encode_chunk,
    run_in_background,
)

SECRET = ClusterSecret(b"shared block tests' cluster secret")
SCOPE = PrefixScope("tenant-salt", "tiny-gpt", "1")
SHAPE = torch.Size((2, 2, 1, 4, 8))
HASHES = prompt_block_hashes(list(range(16)), 4, SCOPE)
BLOCKS = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(4)]
# Bits that compare unequal to themselves or to +0.0 must still come back as they were.
BLOCKS[0].view(-1)[:2] = torch.tensor([float("nan"), -0.0])


def leading_reason(blob: bytes, hashes=HASHES, scope=SCOPE) -> str:
    with pytest.raises(CodecError) as info:
        decode_leading_chunk(blob, hashes, scope, SHAPE, torch.float32, SECRET)
    return info.value.reason


def chunk_reason(
    blob: bytes, hashes=HASHES, scope=SCOPE, dtype=torch.float32, secret=SECRET
) -> str:
    with pytest.raises(CodecError) as info:
        decode_chunk(blob, hashes, scope, SHAPE, dtype, secret)
    return info.value.reason


def same_bits(left: torch.Tensor, right: torch.Tensor) -> bool:
    return torch.equal(left.view(torch.int32), right.view(torch.int32))


def test_a_chunk_of_the_first_blocks_asked_for_round_trips_bit_exact():
    blob = encode_chunk(BLOCKS[:2], HASHES[:2], SCOPE, SECRET)
    decoded = decode_leading_chunk(blob, HASHES, SCOPE, SHAPE, torch.float32, SECRET)
    assert len(decoded) == 2 and all(map(same_bits, decoded, BLOCKS[:2]))


def test_a_chunk_round_trips_bit_exact():
    blob = encode_chunk(BLOCKS, HASHES, SCOPE, SECRET)
    decoded = decode_chunk(blob, HASHES, SCOPE, SHAPE, torch.float32, SECRET)
    assert len(decoded) == 4 and all(map(same_bits, decoded, BLOCKS))


@pytest.mark.parametrize(
    ("hashes", "scope"),
    [
        (HASHES[1:], SCOPE),  # the chunk's blocks, but not the ones asked for first
        (HASHES[:1], SCOPE),  # more blocks than were asked for
        ([HASHES[1], HASHES[0], *HASHES[2:]], SCOPE),
        (HASHES, SCOPE._replace(model_id="other")),
        (HASHES, SCOPE._replace(model_version="2")),
    ],
    ids=["later", "more", "swapped", "model", "version"],
)
def test_a_leading_chunk_is_refused_unless_it_holds_the_first_blocks_asked_for(hashes, scope):
    blob = encode_chunk(BLOCKS[:2], HASHES[:2], SCOPE, SECRET)
    assert leading_reason(blob, hashes, scope) == "identity"


def test_a_chunk_with_swapped_hashes_is_refused():
    blob = encode_chunk(BLOCKS, HASHES, SCOPE, SECRET)
    assert chunk_reason(blob, hashes=[HASHES[1], HASHES[0], *HASHES[2:]]) == "identity"
    assert chunk_reason(blob, hashes=HASHES[:3]) == "identity"


def test_a_chunk_is_refused_for_another_version_dtype_or_secret_and_when_changed():
    blob = encode_chunk(BLOCKS, HASHES, SCOPE, SECRET)
    assert chunk_reason(blob, scope=SCOPE._replace(model_version="2")) == "identity"
    assert chunk_reason(blob, dtype=torch.float16) == "layout"
    other = ClusterSecret(b"the secret of another cluster")
    assert chunk_reason(blob, secret=other) == "foreign_secret"
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    assert chunk_reason(bytes(flipped)) == "hmac"


def test_work_off_the_loop_runs_in_a_worker_thread():
    async def main() -> threading.Thread:
        return await tiered_prefix.run_off_loop(threading.current_thread)

    assert asyncio.run(main()) is not threading.main_thread()


@pytest.mark.asyncio
@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
async def test_shares_are_encoded_at_a_lower_priority_than_generation():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    # At least SHARING_NICENESS (a process already running nicer keeps its own).
    assert await run_in_background(niceness) == max(niceness(), SHARING_NICENESS)
