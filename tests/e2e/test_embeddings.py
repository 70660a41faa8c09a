"""`/v1/embeddings` of the running app's built-in encoder, through the official client: each
input cached on its own, floats exactly as the encoder computes them, hit or miss."""

from __future__ import annotations

import base64
import struct
import uuid

import pytest
from openai import BadRequestError, OpenAI

from serve_app.config import parse_args
from serve_app.models import ByteTokenizer
from serve_app.models.loading import load_model
from tests.conftest import API_KEYS

pytestmark = pytest.mark.e2e

MODEL = "tiny-embed"


@pytest.fixture(scope="module")
def client(running_app) -> OpenAI:
    return OpenAI(base_url=f"{running_app.url}/v1", api_key=API_KEYS["alice"], max_retries=0)


@pytest.fixture(scope="module")
def encoder(running_app):
    """The app's encoder built here from its spec: the reference, computed without any cache."""
    spec = parse_args(running_app.app_args()).model(MODEL)
    return load_model(spec, device="cpu")


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def test_an_embedding_is_exactly_the_encoders_and_a_repeat_is_a_hit(client, encoder):
    text = unique("the cache keeps embeddings")
    first = client.embeddings.create(model=MODEL, input=text)
    second = client.embeddings.create(model=MODEL, input=text)
    reference = encoder.embed(ByteTokenizer().encode(text))
    assert first.data[0].embedding == reference
    assert second.data[0].embedding == reference
    assert first.model_dump()["cache"][0]["hit"] is False
    assert second.model_dump()["cache"][0]["hit"] is True
    assert first.usage.prompt_tokens == len(text.encode())
    assert len(reference) == encoder.dimensions


def test_a_batch_computes_only_its_uncached_inputs(client, encoder):
    texts = [unique(f"input {i}") for i in range(6)]
    client.embeddings.create(model=MODEL, input=texts[:3])
    batch = client.embeddings.create(model=MODEL, input=texts)
    hits = [entry["hit"] for entry in batch.model_dump()["cache"]]
    assert hits == [True] * 3 + [False] * 3
    assert [d.index for d in batch.data] == list(range(6))
    for text, data in zip(texts, batch.data, strict=True):
        assert data.embedding == encoder.embed(ByteTokenizer().encode(text))


def test_token_ids_and_base64_give_the_same_floats(client, running_app, encoder):
    text = unique("bytes and floats")
    tokens = ByteTokenizer().encode(text)
    floats = client.embeddings.create(model=MODEL, input=[tokens]).data[0].embedding
    with running_app.http() as http:
        body = {"model": MODEL, "input": text, "encoding_format": "base64"}
        packed = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == floats == encoder.embed(tokens)


def test_bad_embedding_requests_name_the_field(client):
    with pytest.raises(BadRequestError) as info:
        client.embeddings.create(model=MODEL, input=["ok", ""])
    assert info.value.body["param"] == "input"
    with pytest.raises(BadRequestError) as info:
        client.embeddings.create(model="tiny-gpt", input="hi")
    assert info.value.body["param"] == "model"
    with pytest.raises(BadRequestError) as info:
        client.embeddings.create(model=MODEL, input="hi", dimensions=3)
    assert info.value.body["param"] == "dimensions"
    with pytest.raises(BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi")
    assert info.value.body["param"] == "model"
