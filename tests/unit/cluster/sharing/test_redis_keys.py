"""Readable Redis keys: `{ns}:{model}:{version}:{kind}:{hex}`, validated, and their patterns."""

import fnmatch
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.sharing.redis_store import KINDS, redis_key, redis_key_pattern

DIGEST = "0123456789abcdef" * 4


def test_layout():
    assert redis_key("raycache", "tiny-gpt", "v1", "r", "ab01") == "raycache:tiny-gpt:v1:r:ab01"
    assert redis_key("ns", "m", "2024.1", "kv", DIGEST) == f"ns:m:2024.1:kv:{DIGEST}"


@pytest.mark.parametrize(
    "bad",
    ["", "a:b", "a b", "a\tb", "a\nb", "a*", "a?", "a[1]", "a\\b", "{tag}", "a\x00b", "é\u200b"],
)
@pytest.mark.parametrize("position", ["namespace", "model", "version"])
def test_rejects_components_that_break_the_layout_or_patterns(bad, position):
    parts = {"namespace": "ns", "model": "m", "version": "v1"} | {position: bad}
    with pytest.raises(ValueError, match=position):
        redis_key(parts["namespace"], parts["model"], parts["version"], "r", DIGEST)


@pytest.mark.parametrize("bad", [None, 3, b"ns"])
def test_rejects_non_str_components(bad):
    with pytest.raises(ValueError, match="namespace"):
        redis_key(bad, "m", "v", "r", DIGEST)


@pytest.mark.parametrize("kind", ["", "R", "result", "k", "kv:"])
def test_rejects_unknown_kinds(kind):
    with pytest.raises(ValueError, match="kind"):
        redis_key("ns", "m", "v", kind, DIGEST)  # type: ignore[arg-type]


@pytest.mark.parametrize("digest", ["", "AB01", "xyz", "ab 01", "ab:01", "0x1f"])
def test_digest_must_be_lowercase_hex(digest):
    with pytest.raises(ValueError, match="digest_hex"):
        redis_key("ns", "m", "v", "r", digest)


def test_patterns_select_by_model_version_and_kind():
    assert redis_key_pattern("ns") == "ns:*"
    assert redis_key_pattern("ns", "m") == "ns:m:*"
    assert redis_key_pattern("ns", "m", "v1") == "ns:m:v1:*"
    assert redis_key_pattern("ns", "m", "v1", "kv") == "ns:m:v1:kv:*"
    assert redis_key_pattern("ns", version="v1") == "ns:*:v1:*"
    with pytest.raises(ValueError, match="model"):
        redis_key_pattern("ns", "m*")
    with pytest.raises(ValueError, match="kind"):
        redis_key_pattern("ns", kind="x")  # type: ignore[arg-type]


component = st.text(
    alphabet=string.ascii_letters + string.digits + "._-/@+=", min_size=1, max_size=20
)
kind = st.sampled_from(sorted(KINDS))
digest = st.text(alphabet="0123456789abcdef", min_size=1, max_size=64)


@given(component, component, component, kind, digest)
def test_keys_split_back_into_their_components(ns, model, version, kind, digest):
    key = redis_key(ns, model, version, kind, digest)
    assert key.split(":") == [ns, model, version, kind, digest]


@given(component, component, component, kind, digest, component, component)
def test_a_pattern_matches_exactly_the_keys_of_its_model_and_version(
    ns, model, version, kind, digest, other_model, other_version
):
    key = redis_key(ns, model, version, kind, digest)
    pattern = redis_key_pattern(ns, model, version)
    # Redis glob and fnmatchcase agree on patterns without [ ] or backslashes (none can occur).
    assert fnmatch.fnmatchcase(key, pattern)
    assert fnmatch.fnmatchcase(key, redis_key_pattern(ns, model, version, kind))
    other = redis_key(ns, other_model, other_version, kind, digest)
    assert fnmatch.fnmatchcase(other, pattern) == ((other_model, other_version) == (model, version))
