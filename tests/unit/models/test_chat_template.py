"""Chat messages to prompt tokens: each turn's prompt begins with the previous turn's prompt and
answer, for the built-in template and for a Hugging Face checkpoint's Jinja template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serve_app.models.chat_template import (
    ChatFormat,
    ChatMessage,
    TemplateError,
    hf_chat_template,
    render_builtin,
)
from serve_app.models.hf import HFTokenizer
from serve_app.models.tokenizer import ByteTokenizer
from tests.support.hf_checkpoints import write_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    ChatMessage("system", "You answer briefly."),
    ChatMessage("user", "What is a prefix cache?"),
]
ANSWERS = ["It keeps the keys and values of prompts.", " Spaces , and\nnew lines!  ", "ok"]


def turns(chat: ChatFormat) -> None:
    """Three turns: each prompt starts with the previous prompt and its answer's tokens."""
    conversation = list(CONVERSATION)
    previous: list[int] | None = None
    previous_answer = ""
    for answer in ANSWERS:
        tokens = chat.prompt_tokens(conversation)
        if previous is not None:
            assert chat.answer_end is not None
            answered = previous + chat._tokenize(previous_answer + chat.answer_end)
            assert tokens[: len(answered)] == answered
        previous, previous_answer = tokens, answer
        conversation += [ChatMessage("assistant", answer), ChatMessage("user", "And?")]


def test_the_builtin_template_extends_each_turn() -> None:
    chat = ChatFormat(render_builtin, ByteTokenizer().encode)
    assert chat.answer_end == "\n"
    text = ByteTokenizer().decode(chat.prompt_tokens(CONVERSATION))
    assert text == "System: You answer briefly.\nUser: What is a prefix cache?\nAssistant: "
    turns(chat)
    prompt = chat.prompt([*CONVERSATION, ChatMessage("assistant", "A"), ChatMessage("user", "B")])
    assert prompt.opening == len(chat.prompt_tokens(CONVERSATION)) - len(b"Assistant: ")


def hf_directory(tmp_path: Path, config: dict) -> Path:
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text("{}")  # a checkpoint directory, for its tokenizer
    return tmp_path


def test_a_checkpoints_jinja_template_extends_each_turn_with_its_own_tokenizer(tmp_path) -> None:
    directory = hf_directory(tmp_path, {"chat_template": CHATML, "eos_token": "</s>"})
    tokenizer = HFTokenizer(directory, frozenset())
    render = hf_chat_template(directory)
    assert render is not None
    chat = ChatFormat(render, lambda text: tokenizer.encode(text, add_special_tokens=False))
    assert chat.answer_end == "<|im_end|>\n"
    turns(chat)
    whole = render(CONVERSATION, True)
    assert tokenizer.decode(chat.prompt_tokens(CONVERSATION)) == tokenizer.decode(
        tokenizer.encode(whole, add_special_tokens=False)
    )


def test_a_template_file_and_named_templates_are_read(tmp_path) -> None:
    write_tokenizer(tmp_path)
    assert hf_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    render = hf_chat_template(tmp_path)
    assert render is not None and render(CONVERSATION[1:], True).endswith("assistant\n")
    named = [{"name": "default", "template": "{{ messages[0]['content'] }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    render = hf_chat_template(tmp_path)
    assert render is not None and render(CONVERSATION, False) == "You answer briefly."


def test_a_template_that_rewrites_earlier_messages_is_tokenized_whole(tmp_path) -> None:
    # The last message is written first: conversations do not grow as texts.
    template = (
        "{{ messages[-1]['content'] }}|{% for m in messages %}{{ m['content'] }};{% endfor %}"
    )
    directory = hf_directory(tmp_path, {"chat_template": template})
    render = hf_chat_template(directory)
    assert render is not None
    chat = ChatFormat(render, ByteTokenizer().encode)
    assert chat.answer_end is None
    expected = ByteTokenizer().encode(render(CONVERSATION, True))
    assert chat.prompt_tokens(CONVERSATION) == expected


def test_a_template_that_refuses_the_conversation_is_a_template_error(tmp_path) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    directory = hf_directory(tmp_path, {"chat_template": template})
    render = hf_chat_template(directory)
    assert render is not None
    chat = ChatFormat(render, ByteTokenizer().encode)
    with pytest.raises(TemplateError, match="user first"):
        chat.prompt_tokens(CONVERSATION)
    assert chat.prompt_tokens(CONVERSATION[1:]) == ByteTokenizer().encode(CONVERSATION[1].content)
