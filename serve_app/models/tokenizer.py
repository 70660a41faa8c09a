"""What generation needs of a tokenizer (`Tokenizer`), and the built-in byte-level one: every
UTF-8 byte is a token, plus one end-of-sequence token.

The byte tokenizer needs no vocabulary file and no download, and any text round-trips exactly,
which keeps cache keys (token ids) a pure function of the prompt text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Tokenizer(Protocol):
    """Text to token ids and back, for one model."""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end a generation (none, for a model that declares none)."""
        ...

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to `vocab_size - 1`."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text`, with the special tokens the tokenizer adds to a prompt (a BOS)
        unless `add_special_tokens` is false; `UnicodeEncodeError` for a lone surrogate."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens skipped."""
        ...


EOS_TOKEN_ID = 256
"""Id of the end-of-sequence token; it never appears in `encode` output."""


class ByteTokenizer:
    """Token ids 0..255 are the bytes of the UTF-8 encoding; 256 is end-of-sequence."""

    eos_token_id = EOS_TOKEN_ID
    eos_token_ids = frozenset({EOS_TOKEN_ID})
    vocab_size = EOS_TOKEN_ID + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of `text` as token ids (this tokenizer adds no special tokens).

        Raises `UnicodeEncodeError` (a `ValueError`) for a lone surrogate, which has no UTF-8
        encoding.
        """
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The text spelled by the byte tokens in `ids`.

        Special ids (>= 256, such as end-of-sequence) are skipped; bytes that are not valid
        UTF-8, e.g. a multi-byte character cut short, become U+FFFD. Raises `ValueError` for a
        negative id.
        """
        return bytes(i for i in ids if i < EOS_TOKEN_ID).decode("utf-8", errors="replace")
