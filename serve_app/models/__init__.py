"""The models a raycache replica serves, and generation over them.

- `tokenizer`: the `Tokenizer` interface, and `ByteTokenizer`, UTF-8 bytes as tokens.
- `hf`: `HFCausalLM` and `HFTokenizer`, a Hugging Face checkpoint directory.
- `loading`: the model and tokenizer a `ModelSpec` names.
- `base`: the `CausalLM` interface and its `KVCache`, which the prefix cache stores.
- `tiny_gpt`: `TinyGPT`, a small deterministic GPT implementing `CausalLM`.
- `generation`: `generate` with `SamplingParams`, returning a `Generation`.
"""

from serve_app.models.base import CausalLM, KVCache, kv_length
from serve_app.models.generation import (
    FinishReason,
    Generation,
    SamplingParams,
    generate,
    pick_token,
)
from serve_app.models.tiny_gpt import CHECKPOINT_FORMAT, TinyGPT, TinyGPTConfig
from serve_app.models.tokenizer import EOS_TOKEN_ID, ByteTokenizer, Tokenizer

__all__ = [
    "CHECKPOINT_FORMAT",
    "EOS_TOKEN_ID",
    "ByteTokenizer",
    "CausalLM",
    "FinishReason",
    "Generation",
    "KVCache",
    "SamplingParams",
    "TinyGPT",
    "TinyGPTConfig",
    "Tokenizer",
    "generate",
    "kv_length",
    "pick_token",
]
