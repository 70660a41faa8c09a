"""Canonical encoding and result keys."""

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.keys import RequestIdentity, canonical_bytes, result_key

IDENTITY = RequestIdentity("ns", "tenant-a", "tiny-gpt", "1", "completion")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_encoding_is_deterministic(value):
    assert canonical_bytes(value) == canonical_bytes(value)


@given(st.dictionaries(st.text(max_size=8), st.integers(), max_size=8))
def test_dict_order_does_not_matter(mapping):
    reversed_mapping = dict(reversed(list(mapping.items())))
    assert canonical_bytes(mapping) == canonical_bytes(reversed_mapping)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (["ab", "c"], ["a", "bc"]),
        (1, 1.0),
        ("1", b"1"),
        (True, 1),
        (None, []),
        ([1, [2]], [[1], 2]),
        ({"a": 1}, [["a", 1]]),
    ],
)
def test_different_values_encode_differently(left, right):
    assert canonical_bytes(left) != canonical_bytes(right)


def test_negative_zero_is_zero():
    assert canonical_bytes(-0.0) == canonical_bytes(0.0)


@pytest.mark.parametrize("bad", [float("nan"), {1: "int key"}, object()])
def test_unencodable_values_are_rejected(bad):
    with pytest.raises(TypeError):
        canonical_bytes(bad)


def test_every_identity_field_changes_the_key():
    base = result_key(IDENTITY, [1, 2, 3], {"max_tokens": 4})
    for field in ("namespace", "tenant", "model_id", "model_version", "kind"):
        changed = RequestIdentity(**{**IDENTITY.__dict__, field: "other"})
        assert result_key(changed, [1, 2, 3], {"max_tokens": 4}) != base, field
    assert result_key(IDENTITY, [1, 2, 4], {"max_tokens": 4}) != base
    assert result_key(IDENTITY, [1, 2, 3], {"max_tokens": 5}) != base
    assert result_key(IDENTITY, [1, 2, 3], {"max_tokens": 4}, secret=b"s") != base


def test_a_label_republished_as_a_new_generation_gets_new_keys():
    """A forced republish of a label loads other weights: their answers must not meet the old."""
    base = result_key(IDENTITY, [1, 2, 3], {"max_tokens": 4})
    republished = RequestIdentity(**{**IDENTITY.__dict__, "model_generation": 2})
    assert result_key(republished, [1, 2, 3], {"max_tokens": 4}) != base


def test_key_is_the_same_in_another_process():
    """Keys travel between replicas, so they must not depend on per-process hash seeds."""
    code = (
        "from cluster.keys import RequestIdentity, result_key;"
        "print(result_key(RequestIdentity('ns','tenant-a','tiny-gpt','1','completion'),"
        "[1,2,3], {'max_tokens': 4, 'stop': ['x']}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert other == result_key(IDENTITY, [1, 2, 3], {"max_tokens": 4, "stop": ["x"]})
    assert len(other) == 64


def test_token_ids_bytes_are_fixed_width_little_endian_and_decide_the_ids():
    from cluster.keys import token_ids_bytes

    assert token_ids_bytes([1, 256]) == (1).to_bytes(8, "little") + (256).to_bytes(8, "little")
    assert token_ids_bytes(()) == b""
    seen = {token_ids_bytes(ids) for ids in ([1], [1, 0], [0, 1], [256], [1, 1], [2**31 - 1])}
    assert len(seen) == 6
    with pytest.raises(OverflowError):
        token_ids_bytes([2**63])
    with pytest.raises(TypeError):
        token_ids_bytes(["1"])  # type: ignore[list-item]
