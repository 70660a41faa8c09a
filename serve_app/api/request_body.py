"""The one place where an HTTP request body becomes a JSON value.

`read_json_body(request, max_bytes)` reads and decodes the body of any route. Whatever the client
sends, it returns a JSON value (dict, list, str, int, float, bool or None) or raises a client
error naming where the fault is:

- `BodyTooLarge` (413) on `body` when the body is larger than `max_bytes`: a `Content-Length`
  over the limit is refused before a byte is read, and a body without one (chunked) is read as
  it streams in and refused once it passes the limit, so no request makes the ingress hold more
  than `max_bytes` of it;
- `InvalidRequest` (400) on `body` for a malformed `Content-Length`, or bytes that are not UTF-8
  or not JSON (RFC 8259: no `NaN` or `Infinity`);
- `InvalidRequest` (400) on the JSON path of the value at fault (`prompt`, `stop.0`,
  `messages.0.content`; `body` for the top-level value) for a string or key that is not valid
  Unicode (a `"\\ud800"` escape decodes to a lone surrogate, which no UTF-8 encoder, response or
  tokenizer accepts), an integer too long for Python to convert, a number too large for a
  float, a key given twice in one object, or nesting deeper than `max_depth`.

The path joins object keys and list indices with dots. What is accepted can be used anywhere
without further care: every string encodes to UTF-8, every number is finite and converts to
text, and code that recurses over the value will not run out of stack.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from contextlib import aclosing
from typing import Any

from starlette.requests import ClientDisconnect, Request

from serve_app.errors import BodyTooLarge, InvalidRequest

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and lists a body may have (the top-level value is depth 1)."""

# Larger bodies are parsed in a worker thread: checking a few MiB of JSON takes a large share of
# a second, which the event loop would otherwise spend away from every other request.
_PARSE_INLINE_BYTES = 64 * 1024
_DIGITS = re.compile(r"[0-9]+")
# More than any limit can be (2**64 has 20 digits): a longer Content-Length is too large anyway.
_MAX_LENGTH_DIGITS = 20
# A surrogate, paired or lone, can only come from a \uD800-\uDFFF escape: the text is valid UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_UNICODE = "{} is not valid Unicode (a lone surrogate such as \\ud800)"
# Values whose type alone makes them valid wherever they appear; floats are checked at parsing.
_PLAIN_TYPES = frozenset({int, float, bool, type(None)})

Path = tuple[str | int, ...]


async def read_json_body(
    request: Request, max_bytes: int, *, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """The request's body decoded as JSON; raises `BodyTooLarge` or `InvalidRequest` naming
    the field (or `body`) for anything else, as the module docstring says."""
    raw = await read_body(request, max_bytes)
    if len(raw) <= _PARSE_INLINE_BYTES:
        return parse_json(raw, max_depth=max_depth)
    return await asyncio.to_thread(parse_json, raw, max_depth=max_depth)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, read as it streams in; raises `BodyTooLarge` on `body` as soon as
    the declared `Content-Length` or the bytes received pass `max_bytes`."""
    declared = _declared_length(request.headers.getlist("content-length"))
    if declared is not None and declared > max_bytes:
        raise BodyTooLarge(_too_large(max_bytes), param="body")
    received = bytearray()
    try:
        async with aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                received += chunk
                if len(received) > max_bytes:
                    raise BodyTooLarge(_too_large(max_bytes), param="body")
    except ClientDisconnect:
        # Nobody will read the answer; a client error keeps it out of the server-error logs.
        message = "the client left before sending the whole body"
        raise InvalidRequest(message, param="body") from None
    return bytes(received)


def parse_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` decoded as UTF-8 JSON and checked as the module docstring says."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
        raise InvalidRequest(message, param="body") from None
    parse = _Parse()
    try:
        value = parse.loads(text, max_depth)
    except ValueError:
        # An integer past Python's digit limit (sys.get_int_max_str_digits). Rare, so the first
        # parse keeps the built-in int, and this one marks where the integer is.
        parse = _Parse(integers=True)
        value = parse.loads(text, max_depth)
    # The walk over the value costs far more than the parse; these screens of the text skip it
    # for every body that cannot hold a fault.
    if parse.refused or _SURROGATE_ESCAPE.search(raw) or _deeper_than(raw, max_depth):
        _check(value, max_depth)
    return value


class _Rejected:
    """Stands, in a parsed value, for a number or object the parser refused, so that the walk
    can name its path."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Parse:
    """One `json.loads`, with hooks that put a `_Rejected` where a value is refused and
    remember whether they did. With `integers`, integers too long to convert are marked too;
    without, they raise `ValueError`."""

    def __init__(self, integers: bool = False) -> None:
        self.refused = False
        self._integers = integers

    def loads(self, text: str, max_depth: int) -> Any:
        """The value of `text`; raises `InvalidRequest` on `body` for text that is not JSON."""
        try:
            return json.loads(
                text,
                parse_int=self._integer if self._integers else int,
                parse_float=self._float,
                parse_constant=self._constant,
                object_pairs_hook=self._object,
            )
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"not valid JSON ({exc})", param="body") from None
        except RecursionError:
            # The parser recurses once per level and stops near Python's recursion limit.
            message = f"nested deeper than {max_depth} levels"
            raise InvalidRequest(message, param="body") from None

    def _refuse(self, reason: str) -> _Rejected:
        self.refused = True
        return _Rejected(reason)

    def _integer(self, digits: str) -> int | _Rejected:
        try:
            return int(digits)
        except ValueError:
            return self._refuse(f"an integer of {len(digits)} digits is too long")

    def _float(self, text: str) -> float | _Rejected:
        number = float(text)
        return number if math.isfinite(number) else self._refuse("a number too large for a float")

    def _constant(self, name: str) -> _Rejected:
        return self._refuse(f"{name} is not JSON")

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any] | _Rejected:
        value = dict(pairs)
        if len(value) == len(pairs):
            return value
        # Parsers disagree on which copy wins: a proxy that checked one must not see us use the
        # other.
        counts = Counter(key for key, _ in pairs)
        duplicate = next(key for key, count in counts.items() if count > 1)
        return self._refuse(f"the key {duplicate!r} appears more than once")


def _deeper_than(raw: bytes, max_depth: int) -> bool:
    """Whether the JSON text `raw` nests objects and lists deeper than `max_depth`."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    # Brackets inside strings do not count. Without its escaped backslashes and quotes, a string
    # is whatever lies between two quotes: the text outside strings is every other piece.
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(_SQUARE, delete=_NOT_BRACKETS)
    # Each pass removes the innermost level: every empty pair, all at once.
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def _check(value: Any, max_depth: int) -> None:
    """Raise `InvalidRequest` naming the path of a fault in a parsed value, if it has one.

    Iterative, so that no nesting the parser accepted can exhaust the stack here. It builds a
    child's path only for containers: a body can hold a million values.
    """
    _check_scalar(value, ())
    pending: list[tuple[Any, Path]] = [(value, ())] if type(value) in (dict, list) else []
    while pending:
        container, path = pending.pop()
        if len(path) >= max_depth:
            raise InvalidRequest(f"nested deeper than {max_depth} levels", param=_param(path))
        children: Iterable[tuple[str | int, Any]]
        if type(container) is dict:
            if not _is_unicode("".join(container)):
                raise InvalidRequest(_NOT_UNICODE.format("a key"), param=_param(path))
            children = container.items()
        elif _PLAIN_TYPES.issuperset(map(type, container)):
            continue  # say a prompt of token ids: nothing in it can be wrong
        else:
            children = enumerate(container)
        nested = []
        for step, child in children:
            kind = type(child)
            if kind is dict or kind is list:
                nested.append((child, (*path, step)))
            elif (kind is str and not child.isascii()) or kind is _Rejected:
                _check_scalar(child, (*path, step))
        pending.extend(reversed(nested))


def _check_scalar(value: Any, path: Path) -> None:
    if type(value) is str and not _is_unicode(value):
        raise InvalidRequest(_NOT_UNICODE.format("the string"), param=_param(path))
    if type(value) is _Rejected:
        raise InvalidRequest(value.reason, param=_param(path))


def _is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _param(path: Path) -> str:
    return ".".join(str(step) for step in path) or "body"


def _declared_length(values: list[str]) -> int | None:
    """The `Content-Length` the client declared, or None without one."""
    if not values:
        return None
    if len(set(values)) > 1 or not _DIGITS.fullmatch(values[0]):
        raise InvalidRequest("Content-Length must be one decimal number", param="body")
    digits = values[0].lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_LENGTH_DIGITS else 2**64


def _too_large(max_bytes: int) -> str:
    return f"larger than {max_bytes} bytes"
