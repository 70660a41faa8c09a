"""Warm-up files: prompts and transcripts become requests; a bad line is named, nothing sent."""

from __future__ import annotations

import json

import pytest

from serve_app.cli.errors import CliError, ExitCode
from serve_app.cli.warm import CHAT, COMPLETIONS, read_calls


def test_strings_prompts_and_transcripts_become_deterministic_requests(tmp_path):
    file = tmp_path / "warm.jsonl"
    chat = {"model": "other", "messages": [{"role": "user", "content": "hi"}], "seed": 3}
    lines = ["# comment", "", json.dumps({"prompt": "x", "max_tokens": 2}), json.dumps(chat)]
    file.write_text("\n".join([json.dumps("a prompt"), *lines]))
    calls = read_calls(file, "tiny-gpt", 16)
    assert [call.path for call in calls] == [COMPLETIONS, COMPLETIONS, CHAT]
    assert calls[0].body == {
        "model": "tiny-gpt",
        "max_tokens": 16,
        "temperature": 0,
        "prompt": "a prompt",
    }
    assert calls[1].body["max_tokens"] == 2
    assert calls[2].body["model"] == "other" and calls[2].body["seed"] == 3


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{oops", "Expecting"),
        ("42", "expected a string"),
        (json.dumps({"prompt": "a", "messages": []}), "exactly one"),
        (json.dumps({"max_tokens": 3}), "exactly one"),
        (json.dumps({"prompt": "a", "stream": True}), "stream"),
    ],
)
def test_a_bad_line_is_named_with_its_number(tmp_path, line, says):
    file = tmp_path / "warm.jsonl"
    file.write_text(json.dumps("fine") + "\n" + line + "\n")
    with pytest.raises(CliError) as caught:
        read_calls(file, "m", 16)
    assert caught.value.code == ExitCode.USAGE
    assert caught.value.message.startswith(f"{file}:2: ") and says in caught.value.message


def test_an_empty_or_missing_file_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("# nothing\n")
    with pytest.raises(CliError, match="no prompts"):
        read_calls(empty, "m", 16)
    with pytest.raises(CliError, match="cannot read"):
        read_calls(tmp_path / "missing.jsonl", "m", 16)
