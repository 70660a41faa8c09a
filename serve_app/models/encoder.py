"""Embedding models: one input's tokens in, one unit vector of floats out (`SentenceEncoder`).

An embedding is the mean of the encoder's final hidden states over the input's tokens (mean
pooling), L2-normalized as sentence-transformers models with a `Normalize` layer return it, so
cosine similarity is a dot product. Inputs are computed one at a time and never padded: padding
and the shape of a batch change how the kernels round, and a cache must return exactly the
floats an uncached request would compute, whichever inputs shared its request.

- `TinyEncoder`: a small bidirectional transformer with seeded weights, over `ByteTokenizer`.
- `HFEncoder`: a Hugging Face encoder checkpoint from a local directory, over its `HFTokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from serve_app.models.base import ModelWeights, TransformerShape, module_bytes
from serve_app.models.hf import DTYPES, checkpoint_dir
from serve_app.models.tokenizer import ByteTokenizer

# Model types whose position ids start after the padding id (RoBERTa's scheme), so the first
# `pad_token_id + 1` position embeddings never hold a token.
_POSITIONS_AFTER_PADDING: Final = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet"})


@runtime_checkable
class SentenceEncoder(ModelWeights, Protocol):
    """An encoder that embeds one input at a time (`max_context`: most tokens of one input;
    embeddings are float32 values whatever `dtype`)."""

    @property
    def dimensions(self) -> int:
        """Length of each embedding."""
        ...

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """The unit-norm embedding of one input, `dimensions` float32 values.

        Computed for this input alone, without padding, so the values do not depend on any
        other input embedded before, after or alongside it. Raises `ValueError` for an empty
        input, one longer than `max_context`, or an id outside the vocabulary.
        """
        ...


def _token_ids(tokens: Sequence[int], max_context: int, vocab_size: int) -> torch.Tensor:
    """`tokens` as a 1-D long tensor on the CPU, after checking `SentenceEncoder.embed`'s
    contract."""
    ids = torch.as_tensor(list(tokens), dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"embed takes a non-empty 1-D list of token ids, got {tuple(ids.shape)}")
    if ids.numel() > max_context:
        raise ValueError(f"{ids.numel()} tokens exceed max_context {max_context}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    return ids


def _pooled(hidden: torch.Tensor) -> list[float]:
    """The normalized mean of `hidden` `(1, tokens, dimensions)` over its tokens, pooled in
    float32 whatever the model's dtype."""
    return F.normalize(hidden.float().mean(dim=1), dim=-1)[0].tolist()


@dataclass(frozen=True)
class TinyEncoderConfig(TransformerShape):
    """Shape of a TinyEncoder; `d_model` is the embedding's length."""

    vocab_size: int = ByteTokenizer.vocab_size
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    max_context: int = 512
    mlp_ratio: int = 4


class _Block(nn.Module):
    """Pre-LayerNorm self-attention over all tokens (no causal mask), then an MLP."""

    def __init__(self, config: TinyEncoderConfig) -> None:
        super().__init__()
        d, hidden = config.d_model, config.mlp_ratio * config.d_model
        self.n_heads = config.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, hidden, bias=False)
        self.mlp_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(1, 2, 0, 3)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(t, d)
        x = x + self.out(attended)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


class TinyEncoder(nn.Module):
    """A float32 bidirectional transformer encoder for inference only; a `SentenceEncoder`
    over `ByteTokenizer` ids.

    Build one with `from_seed`: the constructor leaves the weights uninitialised.
    """

    def __init__(self, config: TinyEncoderConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config = config
        # Built on the meta device, then allocated uninitialised: the default initialisers
        # would draw from (and so disturb) the global RNG only to be overwritten.
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = nn.Embedding(config.max_context, config.d_model)
            self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
        self.to_empty(device=device)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_seed(
        cls, config: TinyEncoderConfig, seed: int, device: str | torch.device = "cpu"
    ) -> TinyEncoder:
        """A model whose weights depend only on `config` and `seed`, on any device.

        Weights are drawn on the CPU from a private generator, so the global RNG is neither
        read nor advanced.
        """
        model = cls(config, device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        d, residual = config.d_model, (2 * config.n_layers) ** -0.5

        def normal(weight: torch.Tensor, std: float) -> None:
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)

        with torch.no_grad():
            normal(model.tok_emb.weight, 1.0)
            normal(model.pos_emb.weight, 0.5)
            for block in model.blocks:
                assert isinstance(block, _Block)
                normal(block.qkv.weight, d**-0.5)
                normal(block.out.weight, residual * d**-0.5)
                normal(block.mlp_in.weight, d**-0.5)
                normal(block.mlp_out.weight, residual * (config.mlp_ratio * d) ** -0.5)
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
        return model

    @property
    def dimensions(self) -> int:
        return self.config.d_model

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def weight_bytes(self) -> int:
        return module_bytes(self)

    @torch.inference_mode()
    def embed(self, tokens: Sequence[int]) -> list[float]:
        """See `SentenceEncoder.embed`."""
        ids = _token_ids(tokens, self.max_context, self.vocab_size).to(self.device)
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(len(ids), device=self.device))
        for block in self.blocks:
            x = block(x)
        return _pooled(self.ln_f(x)[None])


def checkpoint_encoder_context(path: str | Path) -> int:
    """Most tokens of one input of the encoder checkpoint in `path`, read from its config
    without the weights (`HFEncoder.max_context`)."""
    config = json.loads((checkpoint_dir(path) / "config.json").read_text())
    positions = int(config["max_position_embeddings"])
    if config.get("model_type") in _POSITIONS_AFTER_PADDING:
        return positions - int(config.get("pad_token_id", 1)) - 1
    return positions


class HFEncoder:
    """A `transformers` encoder (`AutoModel`, e.g. BERT) embedding one input at a time
    (`SentenceEncoder`); its tokenizer is the checkpoint's `HFTokenizer`, whose `encode` adds
    the special tokens (such as BERT's [CLS] and [SEP]) the model was trained with."""

    def __init__(self, model: Any) -> None:
        self._model = model
        config = model.config
        offset = (
            int(config.pad_token_id) + 1 if config.model_type in _POSITIONS_AFTER_PADDING else 0
        )
        self._max_context = int(config.max_position_embeddings) - offset
        self._dimensions = int(config.hidden_size)
        self._vocab_size = int(config.vocab_size)

    @classmethod
    def load(
        cls, path: str | Path, dtype: str = "float32", device: torch.device | str = "cpu"
    ) -> HFEncoder:
        """The checkpoint in directory `path`, in `dtype` (a key of `DTYPES`) on `device`.

        Reads local safetensors only and runs no code from the directory; raises
        `UnsupportedModel` when `path` is not a checkpoint directory.
        """
        from transformers import AutoModel

        directory = checkpoint_dir(path)  # a directory: never a hub id, never a download
        model = AutoModel.from_pretrained(
            directory,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=DTYPES[dtype],
        )
        return cls(model.to(device).eval())

    @staticmethod
    def estimate_bytes(path: str | Path, dtype: str = "float32") -> int:
        """The bytes `load(path, dtype)` will take, without reading the weights: the model
        built from its config on the meta device."""
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(
            checkpoint_dir(path), local_files_only=True, trust_remote_code=False
        )
        with torch.device("meta"):
            model = AutoModel.from_config(config, dtype=DTYPES[dtype], trust_remote_code=False)
        return module_bytes(model)

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    @property
    def weight_bytes(self) -> int:
        return module_bytes(self._model)

    @torch.inference_mode()
    def embed(self, tokens: Sequence[int]) -> list[float]:
        """See `SentenceEncoder.embed`."""
        ids = _token_ids(tokens, self._max_context, self._vocab_size).to(self.device)
        # One unpadded input: every token is attended to, so the mask is all ones.
        mask = torch.ones_like(ids)
        return _pooled(
            self._model(input_ids=ids[None], attention_mask=mask[None]).last_hidden_state
        )
