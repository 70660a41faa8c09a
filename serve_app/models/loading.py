"""Build the model a `ModelSpec` names: from its checkpoint file, or from its seed."""

from __future__ import annotations

import torch

from serve_app.config import ModelSpec
from serve_app.models.tiny_gpt import TinyGPT, TinyGPTConfig


def default_device() -> torch.device:
    """CUDA when the replica has a GPU, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(spec: ModelSpec, device: torch.device | str | None = None) -> TinyGPT:
    """The model of `spec` on `device` (default: `default_device()`).

    A checkpoint wins over the seed; its stored shape must match the spec's, so a config
    cannot silently serve weights other than the ones it describes.
    """
    device = default_device() if device is None else torch.device(device)
    config = TinyGPTConfig(
        n_layers=spec.n_layers,
        d_model=spec.d_model,
        n_heads=spec.n_heads,
        max_context=spec.max_context,
    )
    if spec.checkpoint is None:
        return TinyGPT.from_seed(config, spec.seed, device=device)
    model = TinyGPT.load_checkpoint(spec.checkpoint, device=device)
    if model.config != config:
        raise ValueError(
            f"checkpoint {spec.checkpoint} holds {model.config}, but model {spec.id!r} "
            f"is configured as {config}"
        )
    return model
