"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE splits multi-byte characters across tokens, and SentencePiece-style tokenizers
render a token differently depending on what precedes it. So each step decodes a short window of
recent tokens and emits only what the new tokens added to that window's text, holding back text
that ends in U+FFFD (an incomplete character) until the next token completes it. This is the
scheme vLLM uses (prefix/read offsets), with decode() instead of token strings.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens kept as left context for the first output tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def add(self, token_ids: list[int]) -> str:
        """Returns the text the new tokens complete (possibly "")."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is held back, incomplete characters included."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""
