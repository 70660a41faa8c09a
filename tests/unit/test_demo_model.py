"""`raycache-demo-model`: a checkpoint trained offline on Python's own docstrings, which
raycache then loads and serves like any Hugging Face checkpoint."""

from __future__ import annotations

from serve_app.config import ModelSpec
from serve_app.demo_model import build, stdlib_text
from serve_app.models import SamplingParams, generate
from serve_app.models.loading import load_model, load_tokenizer


def test_the_corpus_is_english_prose_from_the_standard_library():
    texts = stdlib_text(50_000)
    assert sum(map(len, texts)) >= 50_000
    assert any(" the " in text for text in texts)
    assert stdlib_text(50_000) == texts  # the same on every run


def test_a_few_steps_write_a_checkpoint_raycache_serves(tmp_path):
    losses = build(tmp_path, steps=8, seconds=None, seed=0, corpus_chars=300_000, log=False)
    assert len(losses) == 8 and losses[-1] < losses[0]  # it learns
    spec = ModelSpec(id="demo-llama", kind="hf", path=str(tmp_path))
    model, tokenizer = load_model(spec, device="cpu"), load_tokenizer(spec)
    prompt = tokenizer.encode("Return the number of items in the")
    generation = generate(model, tokenizer, prompt, SamplingParams(max_tokens=8))
    assert generation.tokens and isinstance(generation.text, str)
