"""Build the model a `ModelSpec` names, and its tokenizer: the built-in TinyGPT from its
checkpoint file or its seed, or a Hugging Face checkpoint directory."""

from __future__ import annotations

import functools
import importlib
import json
import threading
from pathlib import Path

import torch

from serve_app.config import ModelSpec
from serve_app.models.base import CausalLM
from serve_app.models.chat_template import ChatFormat, hf_chat_template, render_builtin
from serve_app.models.encoder import (
    HFEncoder,
    SentenceEncoder,
    TinyEncoder,
    TinyEncoderConfig,
    checkpoint_encoder_context,
)
from serve_app.models.hf import (
    HFCausalLM,
    HFTokenizer,
    checkpoint_context,
    checkpoint_dir,
    checkpoint_eos,
    checkpoint_vocab,
)
from serve_app.models.tiny_gpt import TinyGPT, TinyGPTConfig
from serve_app.models.tokenizer import ByteTokenizer, Tokenizer


@functools.cache
def _import_torch_dynamo() -> None:
    """Import `torch._dynamo` before a model is built, in a thread of its own.

    torch imports it when it first runs an operation on the meta device (where models are built
    before their weights are allocated), and that import keeps every frame it ran in alive, in a
    reference cycle that only a full garbage collection frees. Run inside a load, those frames
    held the first weights a process built (and the pool's requests for them) long after their
    last request ended; run in a thread of its own, they hold nothing of a model.
    """
    importer = threading.Thread(
        target=importlib.import_module, args=("torch._dynamo",), name="raycache-import"
    )
    importer.start()
    importer.join()


def default_device() -> torch.device:
    """CUDA when the replica has a GPU, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tiny_gpt_config(spec: ModelSpec) -> TinyGPTConfig:
    """The shape a `tiny-gpt` spec declares."""
    return TinyGPTConfig(
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        n_heads=spec.n_heads,
        max_context=spec.max_context,
    )


def tiny_encoder_config(spec: ModelSpec) -> TinyEncoderConfig:
    """The shape a `tiny-encoder` spec declares."""
    return TinyEncoderConfig(
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        n_heads=spec.n_heads,
        max_context=spec.max_context,
    )


Weights = CausalLM | SentenceEncoder
"""What a model pool holds: a generating model or an encoder."""


def load_model(spec: ModelSpec, device: torch.device | str | None = None) -> Weights:
    """The model of `spec` on `device` (default: `default_device()`).

    A TinyGPT checkpoint wins over the seed; its stored shape must match the spec's, so a config
    cannot silently serve weights other than the ones it describes. A Hugging Face model loads
    from its published checkpoint directory, or else from `path`.
    """
    _import_torch_dynamo()
    device = default_device() if device is None else torch.device(device)
    if spec.kind == "hf-encoder":
        assert spec.path is not None  # the spec's validation requires it
        return HFEncoder.load(spec.checkpoint or spec.path, spec.dtype, device)
    if spec.is_hf:
        assert spec.path is not None
        return HFCausalLM.load(spec.checkpoint or spec.path, spec.dtype, device)
    if spec.kind == "tiny-encoder":
        return TinyEncoder.from_seed(tiny_encoder_config(spec), spec.seed, device=device)
    config = tiny_gpt_config(spec)
    if spec.checkpoint is None:
        return TinyGPT.from_seed(config, spec.seed, device=device)
    model = TinyGPT.load_checkpoint(spec.checkpoint, device=device)
    if model.config != config:
        raise ValueError(
            f"checkpoint {spec.checkpoint} holds {model.config}, but model {spec.id!r} "
            f"is configured as {config}"
        )
    return model


def check_weights(spec: ModelSpec) -> None:
    """Raise when `spec`'s weights cannot be found, without reading them: a TinyGPT checkpoint
    that is no file, or a Hugging Face directory without `config.json`."""
    if spec.is_hf:
        assert spec.path is not None
        checkpoint_dir(spec.checkpoint or spec.path)
    elif spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint file at {spec.checkpoint}")


def weight_bytes_estimate(spec: ModelSpec) -> int:
    """The bytes `load_model(spec)` will take, computed without loading the weights (the
    model's modules built on the meta device)."""
    _import_torch_dynamo()
    if spec.kind == "hf-encoder":
        assert spec.path is not None
        return HFEncoder.estimate_bytes(spec.checkpoint or spec.path, spec.dtype)
    if spec.is_hf:
        assert spec.path is not None
        return HFCausalLM.estimate_bytes(spec.checkpoint or spec.path, spec.dtype)
    if spec.kind == "tiny-encoder":
        return TinyEncoder(tiny_encoder_config(spec), device="meta").weight_bytes
    return TinyGPT(tiny_gpt_config(spec), device="meta").weight_bytes


def load_tokenizer(spec: ModelSpec) -> Tokenizer:
    """The tokenizer of `spec`'s model: bytes for TinyGPT, the checkpoint's own otherwise
    (read from the configured `path`; a published version keeps its model's tokenizer)."""
    if spec.is_hf:
        assert spec.path is not None
        return HFTokenizer(spec.path, checkpoint_eos(spec.path))
    return ByteTokenizer()


def load_chat_format(spec: ModelSpec, tokenizer: Tokenizer) -> ChatFormat | None:
    """How `spec`'s model turns chat messages into a prompt: TinyGPT's built-in template, or
    the checkpoint's own; None for a checkpoint that has no chat template, and for encoders."""
    if spec.is_encoder:
        return None
    if spec.is_hf:
        assert spec.path is not None
        render = hf_chat_template(checkpoint_dir(spec.path))
        if render is None:
            return None
        return ChatFormat(render, lambda text: tokenizer.encode(text, add_special_tokens=False))
    return ChatFormat(render_builtin, tokenizer.encode)


def model_context(spec: ModelSpec) -> int:
    """The longest sequence (prompt and completion; an encoder's input) `spec`'s model takes,
    read without it."""
    if spec.kind == "hf-encoder":
        assert spec.path is not None
        return checkpoint_encoder_context(spec.path)
    if spec.is_hf:
        assert spec.path is not None
        return checkpoint_context(spec.path)
    return spec.max_context


def model_dimensions(spec: ModelSpec) -> int:
    """The length of an encoder's embeddings, read without loading it."""
    if spec.kind == "hf-encoder":
        assert spec.path is not None
        return int(
            json.loads((checkpoint_dir(spec.path) / "config.json").read_text())["hidden_size"]
        )
    return spec.d_model


def model_vocab(spec: ModelSpec, tokenizer: Tokenizer) -> int:
    """How many token ids `spec`'s model takes in a prompt: those both its `tokenizer` and its
    embeddings know."""
    if spec.is_hf:
        assert spec.path is not None
        return min(tokenizer.vocab_size, checkpoint_vocab(spec.path))
    return tokenizer.vocab_size
