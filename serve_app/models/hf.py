"""Hugging Face causal LMs from a local directory, as `CausalLM`s a prefix cache can serve.

A directory as `save_pretrained` writes it (`config.json`, safetensors weights, and the
`tokenizer.json` of a fast tokenizer) is loaded with `local_files_only` (no download), without
`trust_remote_code` (no code from the directory runs) and from safetensors only (no pickle).

Only architectures whose attention over a cached prefix gives the logits of a full prefill are
served (`SUPPORTED_ARCHITECTURES`): a config with sliding-window attention that a prompt could
outgrow is refused at load, since a prefix cache of full-attention blocks would answer
differently from the model. The model's own cache object (`DynamicCache`) is built from the
cached blocks, so the suffix is computed by the library's attention, positions continuing after
the prefix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch

from serve_app.models.base import KVCache, kv_length

SUPPORTED_ARCHITECTURES: Final = frozenset(
    {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel"}
)
DTYPES: Final = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModel(ValueError):
    """A checkpoint raycache cannot serve exactly (architecture, attention, files)."""


class HFTokenizer:
    """The fast tokenizer of a checkpoint directory (`tokenizer.json`), with the interface of
    `ByteTokenizer`: `encode`, `decode`, `eos_token_id`, `vocab_size`."""

    def __init__(self, path: str | Path, eos_token_id: int | None) -> None:
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise UnsupportedModel(f"{path} holds no tokenizer.json (a fast tokenizer)")
        self._tokenizer = Tokenizer.from_file(str(file))
        self.eos_token_id = -1 if eos_token_id is None else eos_token_id
        """The end-of-sequence id; -1 (never produced) when the model declares none."""
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, without special tokens added (the prompt as given).

        Raises `UnicodeEncodeError` (a `ValueError`) for a lone surrogate, as `ByteTokenizer`
        does, instead of letting the tokenizer replace it."""
        text.encode("utf-8")
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens skipped. Raises `ValueError` for a negative id."""
        if any(i < 0 for i in ids):
            raise ValueError("token ids are never negative")
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))


class HFCausalLM:
    """A `transformers` causal LM computing one sequence incrementally (`CausalLM`).

    A `KVCache` holds, per layer, keys and values shaped `(kv_heads, seq_len, head_dim)` in the
    model's dtype: grouped-query attention keeps its fewer KV heads.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        config = model.config
        self._config = config
        # Every supported config answers to these names (GPT-2's through its attribute map).
        self._max_context = int(config.max_position_embeddings)
        self._n_layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        hidden = int(config.hidden_size)
        self._head_dim = int(getattr(config, "head_dim", None) or hidden // heads)

    @classmethod
    def load(
        cls, path: str | Path, dtype: str = "float32", device: torch.device | str = "cpu"
    ) -> HFCausalLM:
        """The checkpoint in directory `path`, in `dtype` (a key of `DTYPES`) on `device`;
        raises `UnsupportedModel` for what cannot be served exactly."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        check_supported(config)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=DTYPES[dtype],
        )
        return cls(model.to(device).eval())

    @property
    def vocab_size(self) -> int:
        return int(self._config.vocab_size)

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def n_layers(self) -> int:
        return self._n_layers

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, and of the keys and values this model caches."""
        return next(self._model.parameters()).dtype

    def kv_block_shape(self, block_size: int) -> torch.Size:
        """The shape of one prefix-cache block of `block_size` tokens (`PrefixCache` layout:
        layers, keys and values, KV heads, tokens, head dim)."""
        return torch.Size((self._n_layers, 2, self._kv_heads, block_size, self._head_dim))

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence id the config declares (the first, when it lists several)."""
        eos = getattr(self._config, "eos_token_id", None)
        if isinstance(eos, list):
            return int(eos[0]) if eos else None
        return None if eos is None else int(eos)

    @torch.inference_mode()
    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        ids = torch.as_tensor(list(tokens) if not torch.is_tensor(tokens) else tokens)
        ids = ids.to(device=self.device, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        n_past = kv_length(past)
        if n_past + ids.numel() > self._max_context:
            raise ValueError(
                f"{n_past} cached and {ids.numel()} new tokens exceed the context of "
                f"{self._max_context}"
            )
        output = self._model(input_ids=ids[None], cache=self._cache_of(past), use_cache=True)
        new_past = tuple((layer.keys[0], layer.values[0]) for layer in output.cache.layers)
        return output.logits[0].float(), new_past

    def decode_step(self, token: int, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        logits, new_past = self.prefill([token], past)
        return logits[0], new_past

    def _cache_of(self, past: KVCache | None) -> Any:
        """The library's cache object holding `past` (not modified: the library appends by
        concatenating into new tensors)."""
        from transformers import DynamicCache

        if not past:
            return DynamicCache(config=self._config)
        if len(past) != self._n_layers:
            raise ValueError(f"past holds {len(past)} layers, the model {self._n_layers}")
        expected = (self._kv_heads, kv_length(past), self._head_dim)
        for keys, values in past:
            if tuple(keys.shape) != expected or tuple(values.shape) != expected:
                raise ValueError(f"past tensors must be shaped {expected}")
        return DynamicCache(
            ddp_cache_data=[(keys[None], values[None]) for keys, values in past],
            config=self._config,
        )


def check_supported(config: Any) -> None:
    """Raise `UnsupportedModel` unless `config` is an architecture served exactly."""
    architectures = list(getattr(config, "architectures", None) or [])
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"architecture {architectures or 'unknown'} is not served; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    context = getattr(config, "max_position_embeddings", None)
    if uses_window and window is not None and context is not None and window < context:
        raise UnsupportedModel(
            f"sliding-window attention ({window} tokens) within a context of {context}: a "
            "prefix cache of full-attention blocks would answer differently; serve it with "
            "sliding_window >= max_position_embeddings, or without sliding windows"
        )


def checkpoint_context(path: str | Path) -> int:
    """The longest sequence the model in `path` takes, from its `config.json` (read without
    the model)."""
    data = _config_json(path)
    context = data.get("max_position_embeddings", data.get("n_positions"))
    if not isinstance(context, int) or context < 2:
        raise UnsupportedModel(f"{path}/config.json declares no usable context length")
    return context


def checkpoint_eos(path: str | Path) -> int | None:
    """The end-of-sequence id that `config.json` in `path` declares, read without the model."""
    eos = _config_json(path).get("eos_token_id")
    if isinstance(eos, list):
        return int(eos[0]) if eos else None
    return None if eos is None else int(eos)


def _config_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{file} is not a JSON object")
    return data
