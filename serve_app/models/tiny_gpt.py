"""TinyGPT: a small pre-LayerNorm GPT with random but deterministic weights.

It stands in for a real model: its cost grows with the prompt like a real one's and it obeys
the `CausalLM` contract, so prefix caching can be measured and checked without downloads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from serve_app.models.base import KVCache, TransformerShape, kv_length, module_bytes

CHECKPOINT_FORMAT = "raycache.tiny_gpt.v1"

# Standard deviation of the logits of a freshly seeded model. Large enough that the top two
# logits are typically far apart compared with float32 rounding (~1e-5 here), so greedy
# decoding gives the same tokens whether a prompt is prefilled whole or in chunks.
_LOGIT_STD = 8.0


@dataclass(frozen=True)
class TinyGPTConfig(TransformerShape):
    """Shape of a TinyGPT. The defaults (4.3M weights) prefill 512 tokens in about 70 ms on
    one CPU thread."""

    vocab_size: int = 257
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    max_context: int = 4096
    mlp_ratio: int = 4


class _Attention(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        t, d = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.n_heads, d // self.n_heads).permute(1, 2, 0, 3)
        if past is not None:
            k = torch.cat((past[0], k), dim=1)
            v = torch.cat((past[1], v), dim=1)
        n_past = k.shape[1] - t
        if n_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # `is_causal` aligns the mask top-left, which is wrong when queries start after the
            # past: query i may see keys 0..n_past + i.
            mask = torch.ones(t, n_past + t, dtype=torch.bool, device=x.device).tril(n_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # Contiguous, so a cached entry does not keep the whole qkv projection alive.
        return self.out(y.transpose(0, 1).reshape(t, d)), (k.contiguous(), v.contiguous())


class _Block(nn.Module):
    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = _Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp_in = nn.Linear(config.d_model, hidden, bias=False)
        self.mlp_out = nn.Linear(hidden, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, kv = self.attn(self.ln1(x), past)
        x = x + attended
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x)))), kv


class TinyGPT(nn.Module):
    """A float32 GPT for inference only; implements `CausalLM`.

    Build one with `from_seed` or `load_checkpoint`: the constructor leaves the weights
    uninitialised.
    """

    def __init__(self, config: TinyGPTConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.config = config
        # Built on the meta device, then allocated uninitialised: the default initialisers
        # would draw from (and so disturb) the global RNG only to be overwritten.
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = nn.Embedding(config.max_context, config.d_model)
            self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.requires_grad_(False)
        self.eval()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def weight_bytes(self) -> int:
        return module_bytes(self)

    def kv_block_shape(self, block_size: int) -> torch.Size:
        config = self.config
        head_dim = config.d_model // config.n_heads
        return torch.Size((config.n_layers, 2, config.n_heads, block_size, head_dim))

    @classmethod
    def from_seed(
        cls, config: TinyGPTConfig, seed: int, device: str | torch.device = "cpu"
    ) -> TinyGPT:
        """A model whose weights depend only on `config` and `seed`, on any device.

        Weights are drawn on the CPU from a private generator, so the global RNG is neither
        read nor advanced.
        """
        model = cls(config, device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        d, residual = config.d_model, (2 * config.n_layers) ** -0.5

        def normal(weight: torch.Tensor, std: float) -> None:
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)

        # Unit-variance queries and keys give attention patterns that are far from uniform,
        # so a wrong mask or position changes the logits visibly.
        with torch.no_grad():
            normal(model.tok_emb.weight, 1.0)
            normal(model.pos_emb.weight, 0.5)
            for block in model.modules():
                if isinstance(block, _Block):
                    normal(block.attn.qkv.weight, d**-0.5)
                    normal(block.attn.out.weight, residual * d**-0.5)
                    normal(block.mlp_in.weight, d**-0.5)
                    normal(block.mlp_out.weight, residual * (config.mlp_ratio * d) ** -0.5)
            normal(model.lm_head.weight, _LOGIT_STD * d**-0.5)
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
        return model

    @torch.inference_mode()
    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """See `CausalLM.prefill`."""
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence, got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        n_past = self._check_past(past)
        if n_past + len(ids) > self.max_context:
            raise ValueError(
                f"{n_past} past + {len(ids)} new tokens exceed max_context {self.max_context}"
            )
        positions = torch.arange(n_past, n_past + len(ids), device=self.device)
        x = self.tok_emb(ids) + self.pos_emb(positions)
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, past[i] if past else None)
            cache.append(kv)
        return self.lm_head(self.ln_f(x)), tuple(cache)

    def decode_step(self, token: int, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        """See `CausalLM.decode_step`."""
        logits, cache = self.prefill([token], past)
        return logits[0], cache

    def _check_past(self, past: KVCache | None) -> int:
        """The length of `past`, after checking it has this model's shape."""
        n_past = kv_length(past)
        if not past:
            return 0
        c = self.config
        expected = (c.n_heads, n_past, c.d_model // c.n_heads)
        if len(past) != c.n_layers or any(
            tuple(t.shape) != expected for layer in past for t in layer
        ):
            raise ValueError(
                f"past must hold {c.n_layers} (key, value) pairs shaped {expected}, got "
                f"{[tuple(t.shape) for layer in past for t in layer]}"
            )
        return n_past

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the weights to a safetensors file, with the config in its metadata."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(self.config))}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> TinyGPT:
        """The model saved at `path` by `save_checkpoint`, on `device`.

        Reads safetensors only (no pickle). Raises `ValueError` naming the problem when the
        file is not such a checkpoint or its tensors do not match its config.
        """
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                # The handle is not a mapping; `keys()` is its only listing (hence the noqa).
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path}: format is {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        try:
            config = TinyGPTConfig(**json.loads(metadata["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad config in metadata ({exc})") from None
        model = cls(config, device)
        expected = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
        found = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
        if found != expected:
            problems = [
                f"{name}: expected {expected.get(name)}, found {found.get(name)}"
                for name in sorted(expected.keys() | found.keys())
                if expected.get(name) != found.get(name)
            ]
            raise ValueError(f"{path}: tensors do not match {config}: " + "; ".join(problems))
        with torch.no_grad():
            model.load_state_dict(tensors)
        for name, t in model.state_dict().items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {name} holds non-finite values")
        return model
