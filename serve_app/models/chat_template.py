"""Chat messages to prompt tokens, so that each turn's prompt extends the previous one.

A conversation is rendered message by message: the text a message adds to the conversation
(what the template renders for the messages up to it, past what it renders for the ones
before) is one segment, and the prompt's tokens are the segments' tokens in order, followed by
the generation prompt's (the text that opens the assistant's answer). An assistant message's
segment is tokenized as that generation prompt and then the rest. So turn n+1's prompt begins
with exactly turn n's prompt, then the tokens of `answer + answer_end` (the answer as the next
turn sends it back, and the template's end of turn). A replica prefills those after answering,
and the next turn finds its whole conversation in the prefix cache.

Two templates:
- `BUILTIN_TEMPLATE` for TinyGPT (byte-level): `System: ...\\n`, `User: ...\\n`,
  `Assistant: ...\\n`, generation prompt `Assistant: `. Its system line has the form of the
  pinned prompts in `configs/cluster.yaml`, so a conversation starting with one reuses it.
- a Hugging Face checkpoint's own Jinja template (`chat_template` in `tokenizer_config.json`, or
  `chat_template.jinja`), rendered by `transformers`, with its `bos_token` and `eos_token`.

Segments are tokenized on their own. That equals tokenizing the whole rendered text wherever a
boundary falls at a special token or between pre-tokens, as the boundaries of common templates
do. A template that does not render conversations as growing texts (one that rewrites earlier
messages when a later one arrives) is tokenized as one text; its turns then share only what the
tokenizer happens to share, and `answer_end` is None.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["system", "user", "assistant"]
BUILTIN_TEMPLATE = "builtin"
_BUILTIN_LABELS: dict[str, str] = {"system": "System", "user": "User", "assistant": "Assistant"}
# Stands for an answer while finding what the template writes after one.
_ANSWER_MARK = "\x00raycache-answer\x00"


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, its content as plain text."""

    role: Role
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation's prompt tokens."""

    tokens: list[int]
    opening: int
    """How many leading tokens every later turn of the conversation repeats for sure: those
    through its first user message (a key that keeps the conversation in one place)."""


class TemplateError(ValueError):
    """The template cannot render this conversation (it raised, or returned no text)."""


Render = Callable[[Sequence[ChatMessage], bool], str]
"""Renders messages as text; the flag adds the generation prompt."""


def render_builtin(messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
    """The built-in template: one `Label: content` line per message."""
    text = "".join(f"{_BUILTIN_LABELS[m.role]}: {m.content}\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


class ChatFormat:
    """Turns conversations into prompt tokens for one model; see the module docstring.

    `tokenize` must encode text without adding special tokens of its own (the template writes
    the ones it wants, a BOS included).
    """

    def __init__(self, render: Render, tokenize: Callable[[str], list[int]]) -> None:
        self._render = render
        self._tokenize = tokenize
        self._generation_prompt, self._answer_end = self._answer_frame()

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The tokens of `messages` followed by the generation prompt. Raises `TemplateError`
        when the template refuses the conversation (e.g. roles out of the order it allows)."""
        return self.prompt(messages).tokens

    def prompt(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        """`prompt_tokens(messages)`, and where its opening (the conversation up to its first
        user message, which every later turn repeats) ends."""
        full = self._render_checked(messages, True)
        texts = self._growing_texts(messages)
        if texts is None or not full.startswith(texts[-1]):
            tokens = self._tokenize(full)
            return ChatPrompt(tokens, len(tokens))
        tokens: list[int] = []
        opening = None
        for message, (before, after) in zip(messages, itertools.pairwise(texts), strict=True):
            tokens += self._segment_tokens(message, after[len(before) :])
            if opening is None and message.role == "user":
                opening = len(tokens)
        tokens += self._tokenize(full[len(texts[-1]) :])
        return ChatPrompt(tokens, len(tokens) if opening is None else opening)

    @property
    def answer_end(self) -> str | None:
        """What the template writes after an answer: the next turn's prompt continues a prompt
        with the tokens of `answer + answer_end`. None when the template's turns do not extend
        each other."""
        return self._answer_end

    def _growing_texts(self, messages: Sequence[ChatMessage]) -> list[str] | None:
        """The texts of the conversation's beginnings, from none (no text: templates often
        cannot render an empty conversation) to all of it; None when one does not render or
        does not begin with the one before."""
        texts = [""]
        for end in range(1, len(messages) + 1):
            try:
                text = self._render(messages[:end], False)
            except Exception:  # e.g. a template that wants a user message last
                return None
            if not isinstance(text, str) or not text.startswith(texts[-1]):
                return None
            texts.append(text)
        return texts

    def _segment_tokens(self, message: ChatMessage, segment: str) -> list[int]:
        opening = self._generation_prompt
        if message.role == "assistant" and opening and segment.startswith(opening):
            return self._tokenize(opening) + self._tokenize(segment[len(opening) :])
        return self._tokenize(segment)

    def _answer_frame(self) -> tuple[str, str | None]:
        """The generation prompt, and what the template writes after an answer (None when an
        answer is not rendered as generation prompt, answer, then a fixed text)."""
        question = [ChatMessage("user", "?")]
        try:
            asked = self._render(question, False)
            prompted = self._render(question, True)
            answered = self._render([*question, ChatMessage("assistant", _ANSWER_MARK)], False)
        except Exception:
            return "", None
        if not prompted.startswith(asked):
            return "", None
        opening = prompted[len(asked) :]
        rest = answered[len(prompted) :] if answered.startswith(prompted) else ""
        if not rest.startswith(_ANSWER_MARK):
            return opening, None
        return opening, rest[len(_ANSWER_MARK) :]

    def _render_checked(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        try:
            text = self._render(messages, add_generation_prompt)
        except Exception as exc:  # a template's own `raise_exception`, or a Jinja error
            raise TemplateError(f"the model's chat template refused the messages: {exc}") from exc
        if not isinstance(text, str):
            raise TemplateError("the model's chat template rendered no text")
        return text


def hf_chat_template(directory: Path) -> Render | None:
    """The chat template of a Hugging Face checkpoint directory, or None when it has none."""
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"
    if source is None and jinja_file.is_file():
        source = jinja_file.read_text()
    if not isinstance(source, str):
        return None
    special = {
        name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token")
    }
    template: str = source

    def render(messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        conversation = [{"role": m.role, "content": m.content} for m in messages]
        rendered, _ = render_jinja_template(
            [conversation],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **special,
        )
        return str(rendered[0])

    return render


def _token_text(token: object) -> str:
    """A special token of `tokenizer_config.json`: a string, or `{"content": ...}`."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""
