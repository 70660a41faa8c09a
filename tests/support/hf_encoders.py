"""Tiny random Hugging Face encoder checkpoints (BERT, and RoBERTa for its position offset),
written offline with `save_pretrained` and the byte-level BPE tokenizer of `hf_checkpoints`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from tests.support.hf_checkpoints import VOCAB, write_tokenizer

CONTEXT = 512
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


def write_bert(directory: Path, seed: int = 0) -> Any:
    """Write a random BERT of `CONTEXT` positions and a tokenizer to `directory`; returns the
    model (the reference), in eval mode."""
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**SMALL, max_position_embeddings=CONTEXT)).eval()
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return model


def write_roberta(directory: Path, seed: int = 0) -> Any:
    """Write a random RoBERTa to `directory`: its positions start after the padding id (1), so
    `CONTEXT + 2` position embeddings take `CONTEXT` tokens. Returns the model, in eval mode."""
    torch.manual_seed(seed)
    config = RobertaConfig(**SMALL, max_position_embeddings=CONTEXT + 2, pad_token_id=1)
    model = RobertaModel(config).eval()
    model.save_pretrained(directory)
    return model
