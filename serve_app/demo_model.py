"""`raycache-demo-model DIR`: a small Llama-architecture checkpoint that reads as English.

Trained offline, in a few CPU minutes, on text that ships with Python: the docstrings of the
standard library's modules. It writes a byte-level BPE tokenizer (`tokenizer.json`) and the
model (`save_pretrained`: `config.json`, safetensors weights) to DIR, which
`configs/demo-llama.yaml` serves as `kind: hf`. Deterministic for a given seed and step count
(one torch thread); `--seconds` caps the training time instead, for a quick try.
"""

from __future__ import annotations

import argparse
import ast
import random
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

VOCAB = 2048
CONTEXT = 4096  # longer than the examples: long prompts (a 2,048-token prefix) still fit
SEQUENCE = 128  # tokens per training example
SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>", "</s>")
EOS = SPECIAL_TOKENS.index("</s>")


def stdlib_text(limit_chars: int = 4_000_000) -> list[str]:
    """Docstrings of the standard library's own modules, classes and functions (English prose
    that every Python installation carries), in a stable order, up to `limit_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for file in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    texts.append(" ".join(doc.split()))
                    total += len(texts[-1])
                    if total >= limit_chars:
                        return texts
    return texts


def train_tokenizer(texts: Sequence[str], directory: Path, vocab_size: int = VOCAB) -> object:
    """A byte-level BPE tokenizer of `vocab_size` ids (the first `SPECIAL_TOKENS`) trained on
    `texts`, saved to `directory` as `tokenizer.json`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


def batches(ids: Sequence[int], batch_size: int, rng: random.Random) -> Iterator[torch.Tensor]:
    """Endless batches of `SEQUENCE + 1` consecutive tokens of `ids`, from random offsets."""
    stream = torch.tensor(ids, dtype=torch.long)
    while True:
        starts = [rng.randrange(len(ids) - SEQUENCE - 1) for _ in range(batch_size)]
        yield torch.stack([stream[s : s + SEQUENCE + 1] for s in starts])


def build(
    directory: Path,
    steps: int,
    seconds: float | None,
    seed: int,
    corpus_chars: int = 4_000_000,
    log: bool = True,
) -> list[float]:
    """Train and write the demo checkpoint to `directory` on the first `corpus_chars` of the
    standard library's docstrings; returns the training losses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    directory.mkdir(parents=True, exist_ok=True)
    texts = stdlib_text(corpus_chars)
    tokenizer = train_tokenizer(texts, directory)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)  # type: ignore[attr-defined]
        ids.append(EOS)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=EOS,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    rng = random.Random(seed)
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    for step, batch in zip(range(steps), batches(ids, 16, rng), strict=False):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log and step % 50 == 0:
            print(f"step {step:5d}  loss {losses[-1]:.3f}  {time.monotonic() - started:6.0f} s")
        if seconds is not None and time.monotonic() - started > seconds:
            break
    model.eval().save_pretrained(directory)
    return losses


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write the checkpoint")
    parser.add_argument("--steps", type=int, default=400, help="training steps (batches of 16)")
    parser.add_argument("--seconds", type=float, default=None, help="stop training after this")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    if options.steps < 1:
        parser.error("--steps must be at least 1")
    losses = build(options.directory, options.steps, options.seconds, options.seed)
    print(
        f"wrote {options.directory} after {len(losses)} steps "
        f"(loss {losses[0]:.2f} -> {losses[-1]:.2f})"
    )


if __name__ == "__main__":
    main()
