"""`ReplicaCore.embed` without Ray: each input looked up and computed on its own, for the
built-in encoder and a Hugging Face one, with floats exactly as the encoder computes them."""

from __future__ import annotations

import pytest

from cluster.sharing.directory import ReplicaId
from serve_app.api.embeddings import EmbeddingJob
from serve_app.config import parse_args
from serve_app.errors import InvalidRequest
from serve_app.models.loading import load_model, load_tokenizer, weight_bytes_estimate
from serve_app.replica.core import ReplicaCore
from serve_app.replica.serving import config_version, weights_spec
from tests.support.hf_encoders import write_bert
from tests.unit.serve_app.replica.test_core import SECRET
from tests.unit.serve_app.replica.test_core import job as completion_job

TINY = {"id": "embed", "kind": "tiny-encoder", "n_layers": 1, "d_model": 32, "n_heads": 2}


async def encoder_core(spec_fields: dict) -> ReplicaCore:
    args = parse_args({"namespace": "unit", "models": [spec_fields]})
    (spec,) = args.models
    core = ReplicaCore(
        args,
        SECRET,
        ReplicaId("r1"),
        {spec.id: load_tokenizer(spec)},
        {spec.id: config_version(spec)},
        load_weights=lambda record: load_model(weights_spec(spec, record)),
        estimate_bytes=lambda model: weight_bytes_estimate(spec),
    )
    await core.start()
    return core


def job(core: ReplicaCore, texts: list[str]) -> EmbeddingJob:
    (spec,) = core.args.models
    tokenizer = load_tokenizer(spec)
    inputs = tuple(tuple(tokenizer.encode(text)) for text in texts)
    return EmbeddingJob(spec.id, "default", inputs, tuple(texts))


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["tiny-encoder", "hf-encoder"])
async def test_a_batch_computes_only_its_uncached_inputs_with_the_encoders_floats(
    kind, tmp_path
) -> None:
    fields = (
        TINY if kind == "tiny-encoder" else {"id": "embed", "kind": kind, "path": str(tmp_path)}
    )
    if kind == "hf-encoder":
        write_bert(tmp_path)
    core = await encoder_core(fields)
    first = await core.embed(job(core, ["alpha", "beta"]))
    batch = await core.embed(job(core, ["alpha", "gamma", "beta", "delta"]))
    assert [o.cache_tier for o in first] == [None, None]
    assert [o.cache_tier for o in batch] == ["local", None, "local", None]
    assert core.tiered.stats.computed == 4
    (spec,) = core.args.models
    encoder = load_model(spec, device="cpu")
    tokenizer = load_tokenizer(spec)
    for text, outcome in zip(["alpha", "gamma", "beta", "delta"], batch, strict=True):
        assert outcome.floats() == encoder.embed(tokenizer.encode(text))
    assert batch[0].vector == first[0].vector
    await core.close()


@pytest.mark.asyncio
async def test_an_encoder_does_not_complete() -> None:
    core = await encoder_core(TINY)
    with pytest.raises(InvalidRequest) as info:
        await core.complete(completion_job("hi", model="embed"))
    assert info.value.param == "model"
    await core.close()
