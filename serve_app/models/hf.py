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

from serve_app.models.base import KVCache, kv_length, module_bytes

SUPPORTED_ARCHITECTURES: Final = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
"""`model_type` (what selects the class `transformers` builds) -> the class it must build."""
# Rotary scalings whose frequencies do not depend on how long the sequence is so far (dynamic
# NTK only changes past max_position_embeddings, which prefill refuses); others, such as
# longrope, would make a suffix computed after a cached prefix differ from a full prefill.
_EXACT_ROPE_TYPES: Final = frozenset({"default", "linear", "llama3", "yarn", "dynamic"})
DTYPES: Final = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModel(ValueError):
    """A checkpoint raycache cannot serve exactly (architecture, attention, files)."""


class HFTokenizer:
    """The fast tokenizer of a checkpoint directory (`tokenizer.json`), with the interface of
    `ByteTokenizer` (`Tokenizer`); the end-of-sequence ids are the ones the checkpoint declares
    (`checkpoint_eos`)."""

    def __init__(self, path: str | Path, eos_token_ids: frozenset[int]) -> None:
        from tokenizers import Tokenizer

        file = checkpoint_dir(path) / "tokenizer.json"
        if not file.is_file():
            raise UnsupportedModel(f"{path} holds no tokenizer.json (a fast tokenizer)")
        self._tokenizer = Tokenizer.from_file(str(file))
        # A prompt is what the client sent: never cut to a length, never padded (an encoder
        # would pool the padding).
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.eos_token_ids = eos_token_ids
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of `text`, with the special tokens the tokenizer adds itself (a BOS,
        for most) unless `add_special_tokens` is false, as `transformers` tokenizes a prompt.

        Raises `UnicodeEncodeError` (a `ValueError`) for a lone surrogate, as `ByteTokenizer`
        does, instead of letting the tokenizer replace it."""
        text.encode("utf-8")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

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
        from transformers import AutoModelForCausalLM

        directory = checkpoint_dir(path)  # a directory: never a hub id, never a download
        config = _served_config(directory)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=DTYPES[dtype],
        )
        # The class is chosen by model_type: make sure it is the one that was checked.
        if type(model).__name__ != SUPPORTED_ARCHITECTURES[config.model_type]:
            raise UnsupportedModel(f"{path} built a {type(model).__name__}, which is not served")
        return cls(model.to(device).eval())

    @staticmethod
    def estimate_bytes(path: str | Path, dtype: str = "float32") -> int:
        """The bytes `load(path, dtype)` will take, without reading the weights: the model
        built from its config on the meta device."""
        from transformers import AutoModelForCausalLM

        config = _served_config(checkpoint_dir(path))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], trust_remote_code=False
            )
        return module_bytes(model)

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

    @property
    def weight_bytes(self) -> int:
        return module_bytes(self._model)

    def kv_block_shape(self, block_size: int) -> torch.Size:
        """The shape of one prefix-cache block of `block_size` tokens (`PrefixCache` layout:
        layers, keys and values, KV heads, tokens, head dim)."""
        return torch.Size((self._n_layers, 2, self._kv_heads, block_size, self._head_dim))

    @torch.inference_mode()
    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        ids = torch.as_tensor(list(tokens) if not torch.is_tensor(tokens) else tokens)
        if ids.ndim != 1:
            raise ValueError("prefill takes one sequence: a 1-D list of token ids")
        ids = ids.to(device=self.device, dtype=torch.long)
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
            if {keys.dtype, values.dtype} != {self.dtype} or keys.device != self.device:
                raise ValueError(f"past tensors must be {self.dtype} on {self.device}")
        return DynamicCache(
            ddp_cache_data=[(keys[None], values[None]) for keys, values in past],
            config=self._config,
        )


def check_supported(config: Any) -> None:
    """Raise `UnsupportedModel` unless `config` is an architecture served exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not served; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < context:
        raise UnsupportedModel(
            f"sliding-window attention ({window} tokens) within a context of {context}: a "
            "prefix cache of full-attention blocks would answer differently; serve it with "
            "sliding_window >= max_position_embeddings, or without sliding windows"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModel(
            f"layers of types {sorted(layer_types)}: only full attention is served exactly"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if rope_type not in _EXACT_ROPE_TYPES:
        raise UnsupportedModel(
            f"rotary scaling {rope_type!r} depends on the sequence's length: a suffix after a "
            "cached prefix would differ from a full prefill"
        )


def _served_config(directory: Path) -> Any:
    """The `transformers` config of a checkpoint directory, read from local files only and
    without remote code; raises `UnsupportedModel` for one that cannot be served exactly."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    check_supported(config)
    return config


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a checkpoint directory; raises `UnsupportedModel` when it is none (a name
    that is no directory here could otherwise be taken for a hub id)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise UnsupportedModel(f"{path} is not a checkpoint directory (no config.json in it)")
    return directory


def checkpoint_context(path: str | Path) -> int:
    """The longest sequence the model in `path` takes, from its `config.json` (read without
    the model)."""
    data = _config_json(path)
    context = data.get("max_position_embeddings", data.get("n_positions"))
    if not isinstance(context, int) or context < 2:
        raise UnsupportedModel(f"{path}/config.json declares no usable context length")
    return context


def checkpoint_eos(path: str | Path) -> frozenset[int]:
    """The end-of-sequence ids the checkpoint in `path` declares, in `config.json` and in
    `generation_config.json` (the ids `transformers`' `generate()` stops at), read as JSON."""
    ids: set[int] = set()
    files = [_config_json(path)]
    generation = Path(path) / "generation_config.json"
    if generation.is_file():
        files.append(_config_json(path, generation.name))
    for data in files:
        eos = data.get("eos_token_id")
        for value in eos if isinstance(eos, list) else [eos]:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                ids.add(value)
    return frozenset(ids)


def checkpoint_vocab(path: str | Path) -> int:
    """How many token ids the model in `path` embeds, from its `config.json`."""
    vocab = _config_json(path).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise UnsupportedModel(f"{path}/config.json declares no usable vocab_size")
    return vocab


def _config_json(path: str | Path, name: str = "config.json") -> dict[str, Any]:
    file = Path(path) / name
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise UnsupportedModel(f"{file} is not a JSON object")
    return data
