"""Tiny random Hugging Face checkpoints of every supported architecture, written offline with
`save_pretrained` and a byte-level BPE tokenizer trained on text that ships with Python, and
`transformers`' own greedy generation over them (the independent reference)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from serve_app.demo_model import SPECIAL_TOKENS, train_tokenizer

VOCAB = 320
CONTEXT = 512
EOS = SPECIAL_TOKENS.index("</s>")
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}  # grouped-query attention
COMMON = {"vocab_size": VOCAB, "max_position_embeddings": CONTEXT, "eos_token_id": EOS}

ARCHITECTURES: dict[str, Callable[[], Any]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, **SMALL, **GQA)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON, **SMALL, **GQA)),
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(**COMMON, **SMALL, **GQA, sliding_window=None)
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4, eos_token_id=EOS
        )
    ),
}


def write_checkpoint(architecture: str, directory: Path, seed: int = 0) -> Any:
    """Write a random model of `architecture` and a tokenizer to `directory`; returns the
    model (the reference), in eval mode."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture]().eval()
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return model


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer of `VOCAB` ids, trained offline on Python's own docstrings."""
    train_tokenizer([random.__doc__ or "", torch.__doc__ or ""] * 4, directory, VOCAB)


def reference_greedy(reference: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """`transformers`' own greedy generation, no cache of ours: the tokens after `prompt`, up
    to and without end-of-sequence."""
    ids = torch.tensor([prompt])
    out = reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    return out[: out.index(EOS)] if EOS in out else out
