"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE splits multi-byte characters across tokens, and SentencePiece-style tokenizers
render a token differently depending on what precedes it. Two ways, chosen once per tokenizer:

- Byte-level tokenizers (GPT-2, Llama-3, Qwen: a ByteLevel decoder): every token stands for fixed
  bytes, so a table of them and an incremental UTF-8 decoder give the text, holding back an
  incomplete character until the next token completes it. No tokenizer call per token.
- Others: each step decodes a short window of recent tokens and emits only what the new tokens
  added to that window's text, holding back text that ends in U+FFFD (an incomplete character)
  until the next token completes it. This is the scheme vLLM uses (prefix/read offsets), with
  decode() instead of token strings.

Both give what `tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
gives for the whole output.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from functools import lru_cache

_CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first output tokens


def _gpt2_byte_decoder() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@lru_cache(maxsize=8)
def _byte_tables(tokenizer) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
    """Each token id's bytes, with special tokens as their text and as nothing (skipped); None when
    the tokenizer is not byte-level (or a token is not made of byte characters)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    byte_of = _gpt2_byte_decoder()
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    # what decode(skip_special_tokens=True) drops: the special tokens, and added tokens marked special
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    size = max(len(tokenizer), max(added, default=-1) + 1)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    with_special, without = [], []
    for i, token in enumerate(tokens):
        if i in added:
            data = added[i].encode()
        elif token is None or any(c not in byte_of for c in token):
            return None
        else:
            data = bytes(byte_of[c] for c in token)
        with_special.append(data)
        without.append(b"" if i in special else data)
    return tuple(with_special), tuple(without)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        tables = _byte_tables(tokenizer)
        self._bytes = None if tables is None else tables[1 if skip_special_tokens else 0]
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_ids: Iterable[int]) -> str:
        """Returns the text the new tokens complete (possibly "")."""
        if self._bytes is not None:
            table = self._bytes
            try:
                data = b"".join([table[i] for i in token_ids])
            except IndexError:  # an id past the tokenizer's vocabulary (a padded embedding) reads as nothing
                data = b"".join([table[i] for i in token_ids if i < len(table)])
            return self._utf8.decode(data)
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is held back, incomplete characters included."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
